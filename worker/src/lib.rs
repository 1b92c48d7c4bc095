//! The cellfleet data plane and the `cellfleet` command-line tool, in layers that depend downward only:
//!
//! * `cli` and `bench` on top: the command families and the benchmarks; nothing imports them.
//! * `cluster`: the worker daemon, the job and screen clients, the embedded cluster.
//! * `screen`: screen planning, unit computation, a worker's loop over units, result tables.
//! * `train`: the config, the training loop, fine-tuning, evaluation, checkpoint contents.
//! * `collective`: Gloo, NCCL and single-process collectives with their rendezvous.
//! * `model`: the MoE transformer; `corpus`: h5ad reading, ingest, shard writing, synthetic corpora.
//! * `progress`: progress bars and log lines; `retry`: the one rule for asking the coordinator again;
//!   `state_words`: the words printed for job and screen states; `metrics`: what `/metrics` shows;
//!   `link`: the gRPC connection to a coordinator (TLS, credentials).

pub mod bench;
pub mod cli;
pub mod cluster;
pub mod collective;
pub mod corpus;
pub mod link;
pub mod metrics;
pub mod model;
pub mod progress;
pub mod retry;
pub mod screen;
pub mod state_words;
pub mod train;
