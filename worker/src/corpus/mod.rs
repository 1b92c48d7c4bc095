//! From AnnData files to a tokenized corpus:
//!
//! * `h5ad`: reading AnnData (legacy, 0.7 and modern encodings; dense, CSR and CSC matrices; obs columns);
//! * `ingest`: matrix choice, the validation + HVG pass, the binning pass, the manifest last;
//! * `shard_writer`: parallel shard writing shared by ingest and synth;
//! * `synth`: synthetic scale corpora (and h5ad files) resampled from real cells, marked synthetic;
//! * `inspect`: corpus summary, verification, stream preview.

pub mod h5ad;
pub mod ingest;
pub mod inspect;
pub mod shard_writer;
pub mod synth;
