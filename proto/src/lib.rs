//! gRPC protocol of cellfleet (`proto/cellfleet.proto`): generated tonic/prost code only, nothing
//! hand-written.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("cellfleet.v1");
}

pub use v1::*;
