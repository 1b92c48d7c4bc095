//! Collectives for data parallelism: one `Collective` trait with Gloo (CPU tensors, over TCP), NCCL
//! (CUDA tensors, behind the `cuda` feature) and `Solo` (world 1) behind it, the rendezvous stores that
//! bootstrap a group, and the bucketed helpers the training loop calls on its gradients and parameters.
//!
//! **Failure contract:** a peer that dies or stops answering turns the next operation into
//! `CollectiveError::PeerLost` within the group's timeout; nothing hangs and nothing aborts the process.
//! A group that failed once stays failed (every later call returns `PeerLost`): survivors re-form a new
//! group under a new key prefix.

mod gloo;
#[cfg(feature = "cuda")]
mod nccl;
mod rendezvous;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

pub use gloo::{GlooCollective, GlooOptions};
#[cfg(feature = "cuda")]
pub use nccl::{nccl_version, NcclCollective, NcclMode};
pub use rendezvous::{DirRendezvous, MemoryRendezvous};

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer is gone or did not answer within the timeout (survivors must re-form the group).
    #[error("{0}")]
    PeerLost(String),
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    #[error("{0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, CollectiveError>;

impl From<tch::TchError> for CollectiveError {
    fn from(e: tch::TchError) -> Self {
        CollectiveError::Backend(e.to_string())
    }
}

/// Key-value exchange used to bootstrap a communicator: `set` once per key, `get` blocks until the key
/// is set or the timeout passes. (The cluster implements it over the coordinator's gRPC key-value
/// exchange; `MemoryRendezvous` serves tests and `DirRendezvous` processes on one machine.)
pub trait RendezvousStore: Send + Sync {
    fn set(&self, key: &str, value: &[u8]) -> anyhow::Result<()>;
    fn get(&self, key: &str, timeout: Duration) -> anyhow::Result<Vec<u8>>;
}

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// "solo" | "gloo" | "nccl"
    fn backend(&self) -> &'static str;
    /// In-place element-wise sum over all ranks of a contiguous f32 tensor on this backend's device.
    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<()>;
    /// In-place: every rank ends with root's values.
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
}

/// The group of one: every operation is a no-op.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "solo"
    }
    fn all_reduce_sum(&mut self, _tensor: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _tensor: &mut Tensor, root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Picks `Solo` for world 1, NCCL for a CUDA device (an error naming the `cuda` feature when built
/// without it), Gloo for the CPU. Gloo binds and advertises `hostname` (127.0.0.1 only reaches ranks on the
/// same machine).
pub fn connect(
    store: Arc<dyn RendezvousStore>,
    prefix: &str,
    rank: usize,
    world: usize,
    device: Device,
    hostname: &str,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    check_rank(rank, world)?;
    if world == 1 {
        return Ok(Box::new(Solo));
    }
    match device {
        Device::Cuda(index) => connect_nccl(store, prefix, rank, world, index, timeout),
        Device::Cpu => {
            let options = GlooOptions {
                hostname: hostname.to_string(),
                timeout,
            };
            Ok(Box::new(GlooCollective::connect(
                store, prefix, rank, world, &options,
            )?))
        }
        other => Err(CollectiveError::Backend(format!(
            "no collective backend for device {other:?} (Gloo serves the CPU, NCCL serves CUDA)"
        ))),
    }
}

#[cfg(feature = "cuda")]
fn connect_nccl(
    store: Arc<dyn RendezvousStore>,
    prefix: &str,
    rank: usize,
    world: usize,
    device_index: usize,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    Ok(Box::new(NcclCollective::connect(
        store,
        prefix,
        rank,
        world,
        device_index,
        timeout,
        NcclMode::default(),
    )?))
}

#[cfg(not(feature = "cuda"))]
fn connect_nccl(
    _store: Arc<dyn RendezvousStore>,
    _prefix: &str,
    _rank: usize,
    _world: usize,
    device_index: usize,
    _timeout: Duration,
) -> Result<Box<dyn Collective>> {
    Err(CollectiveError::Backend(format!(
        "device cuda:{device_index} needs NCCL, but this cellfleet was built without the `cuda` \
         feature (rebuild with `cargo build --release --features cuda`)"
    )))
}

/// Bucket size of `broadcast_tensors`.
const BROADCAST_BUCKET_BYTES: usize = 32 << 20;

/// Sums `tensors` (e.g. gradients; all f32, same device, any shapes) across ranks: copies them into flat
/// buckets of at most `bucket_bytes`, all-reduces each bucket, copies the sums back in place. One tensor
/// larger than a bucket gets its own bucket.
pub fn all_reduce_buckets(
    collective: &mut dyn Collective,
    tensors: &[Tensor],
    bucket_bytes: usize,
) -> Result<()> {
    check_same_device(tensors)?;
    if let Some(t) = tensors.iter().find(|t| t.kind() != Kind::Float) {
        return Err(CollectiveError::Backend(format!(
            "all_reduce_buckets sums f32 tensors, got {:?}",
            t.kind()
        )));
    }
    if collective.world() == 1 {
        return Ok(());
    }
    for range in buckets(tensors, bucket_bytes) {
        through_bucket(&tensors[range], |flat| collective.all_reduce_sum(flat))?;
    }
    Ok(())
}

/// Broadcasts `tensors` from `root` in place (bucketed the same way; tensors of one dtype share a bucket).
pub fn broadcast_tensors(
    collective: &mut dyn Collective,
    tensors: &[Tensor],
    root: usize,
) -> Result<()> {
    check_same_device(tensors)?;
    check_root(root, collective.world())?;
    if collective.world() == 1 {
        return Ok(());
    }
    for range in buckets(tensors, BROADCAST_BUCKET_BYTES) {
        through_bucket(&tensors[range], |flat| collective.broadcast(flat, root))?;
    }
    Ok(())
}

fn byte_size(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Consecutive runs of tensors of one dtype whose bytes add up to at most `bucket_bytes` (a larger tensor
/// alone). Every rank holds the same shapes, so every rank cuts the same buckets.
fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        let size = byte_size(t);
        let fits = bytes + size <= bucket_bytes && t.kind() == tensors[start].kind();
        if i > start && !fits {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// Runs `op` on one flat tensor holding `tensors`, then writes the result back into their storage. A
/// single contiguous tensor is handed over directly (its detached alias shares the storage), saving the
/// copies.
fn through_bucket(tensors: &[Tensor], mut op: impl FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
    if let [only] = tensors {
        if only.is_contiguous() {
            return op(&mut only.detach());
        }
    }
    tch::no_grad(|| {
        let flat: Vec<Tensor> = tensors
            .iter()
            .map(|t| t.detach().f_reshape([-1]))
            .collect::<std::result::Result<_, _>>()?;
        let mut bucket = Tensor::f_cat(&flat, 0)?;
        op(&mut bucket)?;
        let mut offset = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            let part = bucket.f_narrow(0, offset, n)?.f_view_as(t)?;
            t.shallow_clone().f_copy_(&part)?;
            offset += n;
        }
        Ok(())
    })
}

fn check_same_device(tensors: &[Tensor]) -> Result<()> {
    if let Some(first) = tensors.first() {
        let device = first.device();
        if let Some(t) = tensors.iter().find(|t| t.device() != device) {
            return Err(CollectiveError::Backend(format!(
                "tensors on different devices ({device:?} and {:?})",
                t.device()
            )));
        }
    }
    Ok(())
}

fn check_rank(rank: usize, world: usize) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(CollectiveError::Backend(format!(
            "rank {rank} is outside a world of {world}"
        )));
    }
    Ok(())
}

fn check_root(root: usize, world: usize) -> Result<()> {
    if root >= world {
        return Err(CollectiveError::Backend(format!(
            "broadcast root {root} is outside a world of {world}"
        )));
    }
    Ok(())
}

/// The checks every backend makes on a tensor it is handed: contiguous, of the expected dtype, on the
/// expected device.
fn check_tensor(tensor: &Tensor, kind: Option<Kind>, device: Device, op: &str) -> Result<()> {
    if let Some(kind) = kind {
        if tensor.kind() != kind {
            return Err(CollectiveError::Backend(format!(
                "{op} needs a {kind:?} tensor, got {:?}",
                tensor.kind()
            )));
        }
    }
    if tensor.device() != device {
        return Err(CollectiveError::Backend(format!(
            "{op} needs a tensor on {device:?}, got one on {:?}",
            tensor.device()
        )));
    }
    if !tensor.is_contiguous() {
        return Err(CollectiveError::Backend(format!(
            "{op} needs a contiguous tensor"
        )));
    }
    Ok(())
}
