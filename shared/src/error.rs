//! Errors of the shared library: each names the object and what was expected.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{url}: {why}")]
    BadUrl { url: String, why: String },
    #[error("{op} {url} failed: {source}")]
    Store {
        url: String,
        op: &'static str,
        source: Box<object_store::Error>,
    },
    #[error("no corpus at {url}: {name} is missing (an ingest that did not finish leaves none)")]
    NoManifest { url: String, name: &'static str },
    #[error("{url}/{name}: manifest is not valid: {why}")]
    BadManifest {
        url: String,
        name: String,
        why: String,
    },
    #[error("shard {name}: {what}")]
    CorruptShard { name: String, what: String },
    #[error("shard {name}: content hash is {actual}, the manifest says {expected} (corrupt or replaced object)")]
    HashMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("shard {name}: {actual} bytes stored, the manifest says {expected}")]
    SizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("zstd: {0}")]
    Compression(std::io::Error),
    #[error("invalid stream setting: {0}")]
    Config(String),
    #[error("{what} is not a valid safetensors file: {why}")]
    BadSafetensors { what: String, why: String },
    #[error("cannot lay out a safetensors file: {0}")]
    SafetensorsLayout(String),
    #[error("sample loader stopped: {0}")]
    Loader(String),
    #[error("metadata store {store}: {why}")]
    Meta { store: String, why: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
