//! In-silico perturbation screens on the worker side: reading a screen specification, resolving it into
//! a plan against the checkpoint and the corpus (every check that can fail happens here, before any work
//! is submitted), computing one work unit with the model, and serving a screen's units as a fleet worker.
//!
//! A cell is the token sequence `[CLS]` + every vocabulary gene in vocabulary order with its expression
//! bin. Pretraining permutes every clone's gene order (bootstrapped-permutation augmentation), so the
//! model reads a cell as a set of (gene, bin) tokens and an order carries no expression meaning. Effects
//! are measured in the model's expected expression (default), the mean of a layer's gene-token states or
//! the `[CLS]` state, always leaving the perturbed genes' own coordinates out; see `docs/screens.md`.
//!
//! * `plan`: a specification resolved against the checkpoint and corpus (every refusal happens here);
//! * `compute`: the `Screener`, which computes one work unit with the model;
//! * `serve`: a fleet worker's loop over a screen's leased units;
//! * `tables`: the merged results as Parquet tables;
//! * `anndata`: a writer of AnnData `.h5ad` files (dense X in row chunks, obs, var, uns) that scanpy opens;
//! * `anndata_output`: the per-cell results as `cells.h5ad`.

pub mod anndata;
pub mod anndata_output;
pub mod attribution;
pub mod compute;
pub mod plan;
pub mod pruning;
pub mod serve;
pub mod steer;
pub mod steered;
pub mod tables;
