//! The cellfleet data plane and command-line tool: h5ad ingest, synthetic scale corpora, the model and
//! its training loop, benchmarks. Later issues add collectives and screen execution here.

pub mod bench;
pub mod checkpointing;
pub mod ckptbench;
pub mod ckptcli;
pub mod cluster;
pub mod collective;
pub mod h5ad;
pub mod ingest;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod modelcli;
pub mod optim;
pub mod progress;
pub mod screen;
pub mod screenbench;
pub mod screencli;
pub mod shards;
pub mod synth;
pub mod train;
