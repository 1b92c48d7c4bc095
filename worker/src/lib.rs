//! The cellfleet data plane and command-line tool: h5ad ingest, synthetic scale corpora, benchmarks.
//! Later issues add the model, the training loop, collectives and screen execution here.

pub mod bench;
pub mod h5ad;
pub mod ingest;
pub mod inspect;
pub mod progress;
pub mod shards;
pub mod synth;
