//! Library code both cellfleet roles use: the corpus format, tokenization, the augmented sample stream,
//! object-store access and the metadata store (etcd or in memory). Nothing here links libtorch or HDF5.

pub mod batch;
pub mod checkpoint;
pub mod corpus;
pub mod error;
pub mod manifest;
pub mod meta;
pub mod philox;
pub mod safetensors;
pub mod screen;
pub mod shard;
pub mod stats;
pub mod store;
pub mod stream;
pub mod tokenize;

pub use error::{Error, Result};
