//! `cellfleet bench nccl-check`: the NCCL path on one GPU. A single-rank communicator all-reduces and
//! broadcasts real CUDA tensors (values checked, bus bandwidth timed), and a two-rank communicator whose
//! second rank never arrives must fail within its timeout, aborted, instead of hanging.
//!
//! The single-rank check runs in every `NcclMode` (blocking or not, null stream or our own), so that a
//! failure says whether it follows the mode training uses (the first) or NCCL on this host.

use std::time::{Duration, Instant};

#[cfg(feature = "cuda")]
pub(crate) fn nccl_check(device_index: usize, mib: usize, timeout: f64) -> anyhow::Result<()> {
    use crate::collective::{nccl_version, MemoryRendezvous, NcclCollective, NcclMode};
    use anyhow::bail;

    println!("nccl: library {}", nccl_version()?);
    let store = MemoryRendezvous::new();
    let timeout = Duration::from_secs_f64(timeout);
    let modes = [
        NcclMode::default(),
        NcclMode {
            blocking: true,
            own_stream: false,
        },
        NcclMode {
            blocking: false,
            own_stream: true,
        },
        NcclMode {
            blocking: true,
            own_stream: true,
        },
    ];
    let mut failed = Vec::new();
    for (index, mode) in modes.into_iter().enumerate() {
        let prefix = format!("nccl-check/solo-{index}");
        match solo_round_trip(store.clone(), &prefix, device_index, mib, timeout, mode) {
            Ok(line) => println!("nccl [{mode}]: {line}"),
            Err(e) => {
                println!("nccl [{mode}]: FAILED: {e:#}");
                failed.push(mode);
            }
        }
    }

    // A group of 2 whose rank 1 never connects: init must give up and abort within the timeout.
    let t0 = Instant::now();
    let lonely = NcclCollective::connect(
        store,
        "nccl-check/lonely",
        0,
        2,
        device_index,
        timeout,
        NcclMode::default(),
    );
    let waited = t0.elapsed().as_secs_f64();
    match lonely {
        Ok(_) => bail!("a 2-rank communicator formed without its second rank"),
        Err(e) => {
            println!(
                "nccl: 2-rank init without its peer failed after {waited:.2} s (timeout {:.1} s), aborted: {e}",
                timeout.as_secs_f64()
            );
            if waited > 3.0 * timeout.as_secs_f64() + 10.0 {
                bail!("the abort took {waited:.1} s, far beyond the {timeout:?} timeout");
            }
        }
    }
    if !failed.is_empty() {
        let modes: Vec<String> = failed.iter().map(|m| format!("[{m}]")).collect();
        bail!(
            "the single-rank round trip failed in {} of 4 modes: {}",
            failed.len(),
            modes.join(", ")
        );
    }
    Ok(())
}

/// One single-rank communicator in `mode`: an all-reduce that must leave the values as they are, 20
/// timed ones, a broadcast and a barrier. Returns a line of what it measured.
#[cfg(feature = "cuda")]
fn solo_round_trip(
    store: std::sync::Arc<crate::collective::MemoryRendezvous>,
    prefix: &str,
    device_index: usize,
    mib: usize,
    timeout: Duration,
    mode: crate::collective::NcclMode,
) -> anyhow::Result<String> {
    use crate::collective::{Collective, NcclCollective};
    use anyhow::{bail, Context};
    use tch::{Device, Kind, Tensor};

    let device = Device::Cuda(device_index);
    let started = Instant::now();
    let mut nccl = NcclCollective::connect(store, prefix, 0, 1, device_index, timeout, mode)
        .context("single-rank NCCL communicator")?;
    let formed = started.elapsed().as_secs_f64();
    let elements = (mib << 20) / 4;
    let values = Tensor::arange(elements as i64, (Kind::Float, device)).remainder(977.0);
    let mut buffer = values.copy();
    nccl.all_reduce_sum(&mut buffer)
        .context("the first all-reduce")?;
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
    nccl.broadcast(&mut buffer, 0).context("broadcast")?;
    nccl.barrier().context("barrier")?;
    Ok(format!(
        "communicator in {formed:.2} s; all-reduce of {mib} MiB leaves the values unchanged, {:.3} ms per call \
         ({:.0} GB/s algorithm bandwidth, 1 rank); broadcast and barrier done",
        seconds * 1e3,
        (mib << 20) as f64 / seconds / 1e9
    ))
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn nccl_check(_device_index: usize, _mib: usize, _timeout: f64) -> anyhow::Result<()> {
    let _ = (Instant::now(), Duration::ZERO);
    anyhow::bail!(
        "this cellfleet was built without the `cuda` feature (rebuild with `cargo build --release --features cuda`)"
    )
}
