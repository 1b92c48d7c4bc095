//! Cluster work from the worker binary's side:
//!
//! * `client`: the gRPC channel, the retry rule for a coordinator that may be restarting, and
//!   `cellfleet train --coordinator` (submit a job and follow it);
//! * `daemon`: `cellfleet worker` (register, heartbeat, follow assignments, train one generation or serve
//!   one screen at a time);
//! * `embedded`: the embedded default, an in-process coordinator with in-memory metadata and N worker
//!   processes of this binary;
//! * `gpus`: `cellfleet worker --gpus`, one supervised worker process per local GPU;
//! * `screen_client`: submitting, following and cancelling screens;

pub mod client;
pub mod daemon;
pub mod embedded;
pub mod gpus;
pub mod screen_client;
