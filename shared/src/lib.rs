//! Library code both cellfleet roles use, grouped by what it is about:
//!
//! * `corpus`: the tokenized corpus (manifest, shard format, binning) and opening one;
//! * `stream`: the deterministic, augmented sample order and the batch loader over it;
//! * `storage` and `checkpoint`: object stores by URL, and checkpoints in them (with safetensors images);
//! * `meta`: the metadata store (etcd or memory) that holds membership, jobs and screens;
//! * `ids`: identifier newtypes (job, worker, screen, generation, rank, step), stored as plain values;
//! * `screen`: screen specifications, plans, unit results, their merge and its statistics;
//! * `philox`: the root of the sample stream's randomness;
//! * `telemetry`: the log set-up both binaries share, and Prometheus metrics over HTTP.
//!
//! Nothing here links libtorch or HDF5.

pub mod checkpoint;
pub mod corpus;
pub mod error;
pub mod hostile;
pub mod ids;
pub mod meta;
pub mod philox;
pub mod screen;
pub mod storage;
pub mod stream;
pub mod telemetry;

pub use error::{Error, Result};
