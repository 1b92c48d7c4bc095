//! The cellfleet control plane: job state machines, membership, data-order planning and screen leasing.
//!
//! Architecture invariant: this crate never touches tensors and never links libtorch. Today it only
//! re-exports the sample-order planner from `cellfleet-shared`, which is the piece the coordinator
//! will own (the global cursor) once the cluster work lands.

pub use cellfleet_shared::stream::{EpochPlan, Partitioner};
