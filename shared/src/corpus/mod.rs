//! Opening a corpus: its manifest, and its shards with every byte checked against the manifest's hash.

pub mod manifest;
pub mod shard;
pub mod tokenize;

use bytes::Bytes;

use crate::corpus::manifest::{Manifest, FORMAT_VERSION, MANIFEST_FILE};
use crate::corpus::shard::Shard;
use crate::error::{Error, Result};
use crate::storage::{S3Options, Store};

/// A corpus whose manifest has been read.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub store: Store,
    pub manifest: Manifest,
}

impl Corpus {
    pub fn open(url: &str, s3: &S3Options) -> Result<Self> {
        Self::from_store(Store::open(url, s3)?)
    }

    pub fn from_store(store: Store) -> Result<Self> {
        let bytes = store
            .get_opt(MANIFEST_FILE)?
            .ok_or_else(|| Error::NoManifest {
                url: store.url().to_string(),
                name: MANIFEST_FILE,
            })?;
        let bad = |why: String| Error::BadManifest {
            url: store.url().to_string(),
            name: MANIFEST_FILE.into(),
            why,
        };
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not supported (this build reads version {FORMAT_VERSION})",
                manifest.format_version
            )));
        }
        manifest.check().map_err(bad)?;
        Ok(Self { store, manifest })
    }

    pub fn total_cells(&self) -> u64 {
        self.manifest.total_cells
    }

    /// Fetches shard `index`, checking size and blake3 against the manifest before parsing.
    pub fn fetch_shard(&self, index: usize) -> Result<Shard> {
        let bytes = self.fetch_verified(index)?;
        let entry = &self.manifest.shards[index];
        let shard = Shard::parse(&entry.name, bytes)?;
        if shard.n_cells != entry.cells as usize
            || shard.n_genes != self.manifest.genes.len()
            || shard.n_label_cols != self.manifest.label_columns.len()
            || shard.block_cells != self.manifest.block_cells as usize
        {
            return Err(Error::CorruptShard {
                name: entry.name.clone(),
                what: format!(
                    "holds {} cells x {} genes with {} label columns in blocks of {}, the manifest says {} x {} with {} in blocks of {}",
                    shard.n_cells,
                    shard.n_genes,
                    shard.n_label_cols,
                    shard.block_cells,
                    entry.cells,
                    self.manifest.genes.len(),
                    self.manifest.label_columns.len(),
                    self.manifest.block_cells
                ),
            });
        }
        Ok(shard)
    }

    /// The stored bytes of shard `index`, verified.
    pub fn fetch_verified(&self, index: usize) -> Result<Bytes> {
        let entry = &self.manifest.shards[index];
        let bytes = self.store.get(&entry.name)?;
        if bytes.len() as u64 != entry.bytes {
            return Err(Error::SizeMismatch {
                name: entry.name.clone(),
                expected: entry.bytes,
                actual: bytes.len() as u64,
            });
        }
        let actual = blake3::hash(&bytes).to_hex().to_string();
        if actual != entry.blake3 {
            return Err(Error::HashMismatch {
                name: entry.name.clone(),
                expected: entry.blake3.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}
