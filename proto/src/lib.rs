//! gRPC protocol of cellfleet: generated tonic/prost code only, nothing hand-written.
//!
//! The `.proto` files arrive with the cluster-training work; until then this crate is empty so the
//! workspace layout is already the one the architecture describes.
