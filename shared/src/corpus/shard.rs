//! The shard file format: binned cells in independently compressed blocks.
//!
//! ```text
//! "CFSHARD1"                                         8 bytes magic
//! n_cells, n_genes, n_label_cols, block_cells, n_blocks   u32 LE each
//! (offset u64, length u64) per block, then for the cell-name frame   relative to the data area
//! data area: one zstd frame per block, then one zstd frame of cell names
//! ```
//! A block frame holds its cells' non-zero bins, column by column: the count of non-zero bins of each
//! cell (u32 LE), then every non-zero bin's gene position (u16 LE), then the bins themselves (u8), then
//! `cells x n_label_cols` label codes (u32 LE). Most of a cell's vocabulary is bin 0, so storing only the
//! non-zero bins cuts the bytes zstd has to compress at ingest and decompress in the loader several-fold. The name frame holds, per cell, its source file index
//! (u32 LE), its row in that file (u64 LE) and its obs name (u32 LE length + UTF-8 bytes).
//! Blocks are the unit of random access: the sample stream decompresses only the blocks it needs.

use crate::error::{Error, Result};

pub const SHARD_MAGIC: &[u8; 8] = b"CFSHARD1";
const HEADER_WORDS: usize = 5;
pub const ZSTD_LEVEL: i32 = 3;
/// Header limits a decoder enforces before it allocates: a vocabulary's token ids are u16, and no
/// writer makes blocks or label sets anywhere near these sizes, so a header beyond them is damaged.
pub const MAX_GENES: usize = 1 << 16;
pub const MAX_BLOCK_CELLS: usize = 1 << 20;
pub const MAX_LABEL_COLUMNS: usize = 1 << 10;
/// The longest cell name a shard may hold (bytes).
pub const MAX_CELL_NAME: usize = 4096;

/// Where one cell came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellOrigin {
    pub source: u32,
    pub row: u64,
    pub name: String,
}

/// Cells of one shard before compression, kept sparse: each cell's non-zero bins only.
#[derive(Debug, Clone, Default)]
pub struct ShardBuilder {
    pub n_genes: usize,
    pub n_label_cols: usize,
    /// Offset of each cell's first non-zero bin in `genes`/`bins`, plus the total at the end.
    offsets: Vec<usize>,
    genes: Vec<u16>,
    bins: Vec<u8>,
    labels: Vec<u32>,
    origins: Vec<CellOrigin>,
}

impl ShardBuilder {
    pub fn new(n_genes: usize, n_label_cols: usize) -> Self {
        assert!(
            n_genes <= 1 << 16,
            "a vocabulary holds at most 65,536 genes"
        );
        Self {
            n_genes,
            n_label_cols,
            offsets: vec![0],
            ..Default::default()
        }
    }

    pub fn cells(&self) -> usize {
        self.origins.len()
    }

    /// Appends a cell given by its non-zero (vocabulary position, bin) pairs.
    pub fn push_sparse(
        &mut self,
        origin: CellOrigin,
        labels: &[u32],
        nonzero: impl IntoIterator<Item = (u16, u8)>,
    ) {
        debug_assert_eq!(labels.len(), self.n_label_cols);
        self.origins.push(origin);
        self.labels.extend_from_slice(labels);
        for (gene, bin) in nonzero {
            debug_assert!(usize::from(gene) < self.n_genes && bin != 0);
            self.genes.push(gene);
            self.bins.push(bin);
        }
        self.offsets.push(self.genes.len());
    }

    /// Appends a cell given as a dense row of bins over the vocabulary.
    pub fn push_dense(&mut self, origin: CellOrigin, labels: &[u32], row: &[u8]) {
        debug_assert_eq!(row.len(), self.n_genes);
        self.push_sparse(
            origin,
            labels,
            row.iter()
                .enumerate()
                .filter(|(_, &b)| b != 0)
                .map(|(g, &b)| (g as u16, b)),
        );
    }

    /// Compresses into the shard byte format.
    pub fn encode(&self, block_cells: usize) -> Result<Vec<u8>> {
        let n_cells = self.cells();
        let n_blocks = n_cells.div_ceil(block_cells);
        let mut frames: Vec<Vec<u8>> = Vec::with_capacity(n_blocks + 1);
        let mut raw = Vec::new();
        for block in 0..n_blocks {
            let lo = block * block_cells;
            let hi = ((block + 1) * block_cells).min(n_cells);
            let (first, last) = (self.offsets[lo], self.offsets[hi]);
            raw.clear();
            for cell in lo..hi {
                raw.extend_from_slice(
                    &((self.offsets[cell + 1] - self.offsets[cell]) as u32).to_le_bytes(),
                );
            }
            for gene in &self.genes[first..last] {
                raw.extend_from_slice(&gene.to_le_bytes());
            }
            raw.extend_from_slice(&self.bins[first..last]);
            for code in &self.labels[lo * self.n_label_cols..hi * self.n_label_cols] {
                raw.extend_from_slice(&code.to_le_bytes());
            }
            frames.push(zstd::bulk::compress(&raw, ZSTD_LEVEL).map_err(Error::Compression)?);
        }
        raw.clear();
        for origin in &self.origins {
            raw.extend_from_slice(&origin.source.to_le_bytes());
            raw.extend_from_slice(&origin.row.to_le_bytes());
            raw.extend_from_slice(&(origin.name.len() as u32).to_le_bytes());
            raw.extend_from_slice(origin.name.as_bytes());
        }
        frames.push(zstd::bulk::compress(&raw, ZSTD_LEVEL).map_err(Error::Compression)?);

        let header_len = 8 + 4 * HEADER_WORDS + 16 * frames.len();
        let data_len: usize = frames.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(header_len + data_len);
        out.extend_from_slice(SHARD_MAGIC);
        for word in [
            n_cells,
            self.n_genes,
            self.n_label_cols,
            block_cells,
            n_blocks,
        ] {
            out.extend_from_slice(&(word as u32).to_le_bytes());
        }
        let mut offset = 0u64;
        for frame in &frames {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&(frame.len() as u64).to_le_bytes());
            offset += frame.len() as u64;
        }
        for frame in &frames {
            out.extend_from_slice(frame);
        }
        Ok(out)
    }
}

/// A stored shard, parsed just enough to decompress single blocks.
#[derive(Debug, Clone)]
pub struct Shard {
    /// The object's name, for errors.
    name: String,
    bytes: bytes::Bytes,
    pub n_cells: usize,
    pub n_genes: usize,
    pub n_label_cols: usize,
    pub block_cells: usize,
    frames: Vec<(usize, usize)>,
}

/// A reusable zstd decompression context and buffer (creating a context per block is measurable).
pub struct BlockDecompressor {
    context: zstd::bulk::Decompressor<'static>,
    raw: Vec<u8>,
}

impl BlockDecompressor {
    pub fn new() -> Result<Self> {
        Ok(Self {
            context: zstd::bulk::Decompressor::new().map_err(Error::Compression)?,
            raw: Vec::new(),
        })
    }
}

/// One decompressed block: `cells` rows of bins and labels.
#[derive(Debug, Clone, Default)]
pub struct Block {
    pub cells: usize,
    pub n_genes: usize,
    pub n_label_cols: usize,
    pub bins: Vec<u8>,
    pub labels: Vec<u32>,
}

impl Block {
    pub fn bins_of(&self, cell: usize) -> &[u8] {
        &self.bins[cell * self.n_genes..(cell + 1) * self.n_genes]
    }
    pub fn labels_of(&self, cell: usize) -> &[u32] {
        &self.labels[cell * self.n_label_cols..(cell + 1) * self.n_label_cols]
    }
}

impl Shard {
    /// Parses the header; `name` only serves error messages.
    pub fn parse(name: &str, bytes: bytes::Bytes) -> Result<Self> {
        let bad = |what: String| Error::CorruptShard {
            name: name.to_string(),
            what,
        };
        if bytes.len() < 8 + 4 * HEADER_WORDS || &bytes[..8] != SHARD_MAGIC {
            return Err(bad(
                "missing the CFSHARD1 magic; not a cellfleet shard".into()
            ));
        }
        let word = |i: usize| {
            u32::from_le_bytes(bytes[8 + 4 * i..12 + 4 * i].try_into().unwrap()) as usize
        };
        let (n_cells, n_genes, n_label_cols, block_cells, n_blocks) =
            (word(0), word(1), word(2), word(3), word(4));
        if block_cells == 0 || n_blocks != n_cells.div_ceil(block_cells) {
            return Err(bad(format!(
                "header says {n_cells} cells in {n_blocks} blocks of {block_cells}"
            )));
        }
        for (field, value, limit) in [
            ("genes", n_genes, MAX_GENES),
            ("cells per block", block_cells, MAX_BLOCK_CELLS),
            ("label columns", n_label_cols, MAX_LABEL_COLUMNS),
        ] {
            if value > limit {
                return Err(bad(format!(
                    "header claims {value} {field}, more than the limit of {limit} (damaged header)"
                )));
            }
        }
        let table_start = 8 + 4 * HEADER_WORDS;
        let data_start = table_start + 16 * (n_blocks + 1);
        if bytes.len() < data_start {
            return Err(bad("truncated block table".into()));
        }
        let mut frames = Vec::with_capacity(n_blocks + 1);
        for i in 0..=n_blocks {
            let at = table_start + 16 * i;
            let offset = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
            let len = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
            let end = (data_start as u64)
                .checked_add(offset)
                .and_then(|start| start.checked_add(len));
            if end.is_none_or(|end| end > bytes.len() as u64) {
                return Err(bad(format!(
                    "frame {i} runs past the end of the shard (truncated?)"
                )));
            }
            frames.push((data_start + offset as usize, len as usize));
        }
        Ok(Self {
            name: name.to_string(),
            bytes,
            n_cells,
            n_genes,
            n_label_cols,
            block_cells,
            frames,
        })
    }

    /// Size of the stored (compressed) shard.
    pub fn stored_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn n_blocks(&self) -> usize {
        self.frames.len() - 1
    }

    pub fn block_len(&self, block: usize) -> usize {
        (self.n_cells - block * self.block_cells).min(self.block_cells)
    }

    /// Decompresses one block into `out` (dense rows), reusing its buffers and the caller's zstd context.
    pub fn read_block_into(
        &self,
        block: usize,
        out: &mut Block,
        zstd: &mut BlockDecompressor,
    ) -> Result<()> {
        let cells = self.block_len(block);
        let bad = |what: String| Error::CorruptShard {
            name: self.name.clone(),
            what: format!("block {block}: {what}"),
        };
        let (start, len) = *self
            .frames
            .get(block)
            .filter(|_| block < self.n_blocks())
            .ok_or_else(|| bad(format!("there are only {} blocks", self.n_blocks())))?;
        let frame = &self.bytes[start..start + len];
        // The densest possible block bounds what a (possibly corrupt) frame header may ask for; the
        // header limits keep this product far from overflowing.
        let most = cells * (4 + 3 * self.n_genes + 4 * self.n_label_cols);
        let size = match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(size)) if size as usize <= most => size as usize,
            _ => return Err(bad("frame header is damaged".into())),
        };
        zstd.raw.resize(size, 0);
        let got = zstd
            .context
            .decompress_to_buffer(frame, &mut zstd.raw[..])
            .map_err(|e| bad(format!("cannot be decompressed ({e})")))?;
        let raw = &zstd.raw[..got];
        if raw.len() < 4 * cells {
            return Err(bad("shorter than its per-cell counts".into()));
        }
        let (counts, rest) = raw.split_at(4 * cells);
        let counts: Vec<usize> = counts
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize)
            .collect();
        let total: usize = counts.iter().sum();
        let labels_len = 4 * cells * self.n_label_cols;
        if counts.iter().any(|&c| c > self.n_genes) || rest.len() != 3 * total + labels_len {
            return Err(bad(format!(
                "holds {} bytes for {total} non-zero bins",
                rest.len()
            )));
        }
        let (genes, rest) = rest.split_at(2 * total);
        let (bins, labels) = rest.split_at(total);
        out.cells = cells;
        out.n_genes = self.n_genes;
        out.n_label_cols = self.n_label_cols;
        out.bins.clear();
        out.bins.resize(cells * self.n_genes, 0);
        let mut at = 0;
        for (cell, &count) in counts.iter().enumerate() {
            let row = &mut out.bins[cell * self.n_genes..(cell + 1) * self.n_genes];
            for k in at..at + count {
                let gene = usize::from(u16::from_le_bytes([genes[2 * k], genes[2 * k + 1]]));
                *row.get_mut(gene)
                    .ok_or_else(|| bad(format!("gene index {gene} is outside the vocabulary")))? =
                    bins[k];
            }
            at += count;
        }
        out.labels.clear();
        out.labels.extend(
            labels
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap())),
        );
        Ok(())
    }

    pub fn read_block(&self, block: usize) -> Result<Block> {
        let mut out = Block::default();
        self.read_block_into(block, &mut out, &mut BlockDecompressor::new()?)?;
        Ok(out)
    }

    pub fn origins(&self) -> Result<Vec<CellOrigin>> {
        let bad = |what: &str| Error::CorruptShard {
            name: self.name.clone(),
            what: format!("cell-name frame {what}"),
        };
        let (start, len) = self.frames[self.n_blocks()];
        let frame = &self.bytes[start..start + len];
        // Bounded like a block: 16 bytes and a name of at most MAX_CELL_NAME per cell.
        let most = self.n_cells * (16 + MAX_CELL_NAME);
        let size = match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(size)) if size as usize <= most => size as usize,
            _ => return Err(bad("has a damaged header")),
        };
        let raw = zstd::bulk::decompress(frame, size)
            .map_err(|e| bad(&format!("cannot be decompressed ({e})")))?;
        let mut origins = Vec::with_capacity(self.n_cells);
        let mut at = 0;
        let take = |at: &mut usize, n: usize| -> Result<&[u8]> {
            let s = raw
                .get(*at..at.saturating_add(n))
                .ok_or_else(|| bad("is truncated"))?;
            *at += n;
            Ok(s)
        };
        for _ in 0..self.n_cells {
            let source = u32::from_le_bytes(take(&mut at, 4)?.try_into().unwrap());
            let row = u64::from_le_bytes(take(&mut at, 8)?.try_into().unwrap());
            let len = u32::from_le_bytes(take(&mut at, 4)?.try_into().unwrap()) as usize;
            let name = String::from_utf8_lossy(take(&mut at, len)?).into_owned();
            origins.push(CellOrigin { source, row, name });
        }
        if at != raw.len() {
            return Err(bad(&format!(
                "has {} bytes after its last cell",
                raw.len() - at
            )));
        }
        Ok(origins)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_partial_last_block() {
        let mut builder = ShardBuilder::new(3, 1);
        for i in 0..5u8 {
            let origin = CellOrigin {
                source: 0,
                row: u64::from(i),
                name: format!("c{i}"),
            };
            builder.push_dense(origin, &[u32::from(i)], &[i, i + 1, i + 2]);
        }
        let bytes = builder.encode(2).unwrap();
        let shard = Shard::parse("t", bytes.into()).unwrap();
        assert_eq!((shard.n_cells, shard.n_blocks()), (5, 3));
        let last = shard.read_block(2).unwrap();
        assert_eq!(
            (last.cells, last.bins_of(0), last.labels_of(0)),
            (1, &[4u8, 5, 6][..], &[4u32][..])
        );
        assert_eq!(shard.origins().unwrap()[3].name, "c3");
    }

    #[test]
    fn truncation_is_reported() {
        let mut builder = ShardBuilder::new(2, 0);
        builder.push_dense(
            CellOrigin {
                source: 0,
                row: 0,
                name: "a".into(),
            },
            &[],
            &[0, 3],
        );
        let bytes = builder.encode(4).unwrap();
        let err = Shard::parse("s", bytes[..bytes.len() - 3].to_vec().into()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
