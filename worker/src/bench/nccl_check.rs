//! `cellfleet bench nccl-check`: the NCCL path on one GPU. A single-rank communicator all-reduces and
//! broadcasts real CUDA tensors (values checked, bus bandwidth timed), and a two-rank communicator whose
//! second rank never arrives must fail within its timeout, aborted, instead of hanging.

use std::time::{Duration, Instant};

#[cfg(feature = "cuda")]
pub(crate) fn nccl_check(device_index: usize, mib: usize, timeout: f64) -> anyhow::Result<()> {
    use crate::collective::{Collective, MemoryRendezvous, NcclCollective};
    use anyhow::{bail, Context};
    use tch::{Device, Kind, Tensor};

    let device = Device::Cuda(device_index);
    let store = MemoryRendezvous::new();
    let started = Instant::now();
    let mut nccl = NcclCollective::connect(
        store.clone(),
        "nccl-check/solo",
        0,
        1,
        device_index,
        Duration::from_secs_f64(timeout),
    )
    .context("single-rank NCCL communicator")?;
    println!(
        "nccl: 1-rank communicator on cuda:{device_index} in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let elements = (mib << 20) / 4;
    let values = Tensor::arange(elements as i64, (Kind::Float, device)).remainder(977.0);
    let mut buffer = values.copy();
    nccl.all_reduce_sum(&mut buffer)?;
    let differs = (&buffer - &values).abs().max().double_value(&[]);
    if differs != 0.0 {
        bail!("a 1-rank all-reduce changed values (max difference {differs})");
    }
    let reps = 20;
    let t0 = Instant::now();
    for _ in 0..reps {
        nccl.all_reduce_sum(&mut buffer)?;
    }
    let seconds = t0.elapsed().as_secs_f64() / f64::from(reps);
    println!(
        "nccl: all-reduce of {mib} MiB: values unchanged, {:.3} ms per call ({:.0} GB/s algorithm bandwidth, 1 rank)",
        seconds * 1e3,
        (mib << 20) as f64 / seconds / 1e9
    );
    nccl.broadcast(&mut buffer, 0)?;
    nccl.barrier()?;
    println!("nccl: broadcast and barrier done");
    drop(nccl);

    // A group of 2 whose rank 1 never connects: init must give up and abort within the timeout.
    let t0 = Instant::now();
    let lonely = NcclCollective::connect(
        store,
        "nccl-check/lonely",
        0,
        2,
        device_index,
        Duration::from_secs_f64(timeout),
    );
    let waited = t0.elapsed().as_secs_f64();
    match lonely {
        Ok(_) => bail!("a 2-rank communicator formed without its second rank"),
        Err(e) => {
            println!("nccl: 2-rank init without its peer failed after {waited:.2} s (timeout {timeout} s), aborted: {e}");
            if waited > 3.0 * timeout + 10.0 {
                bail!("the abort took {waited:.1} s, far beyond the {timeout} s timeout");
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn nccl_check(_device_index: usize, _mib: usize, _timeout: f64) -> anyhow::Result<()> {
    let _ = (Instant::now(), Duration::ZERO);
    anyhow::bail!(
        "this cellfleet was built without the `cuda` feature (rebuild with `cargo build --release --features cuda`)"
    )
}
