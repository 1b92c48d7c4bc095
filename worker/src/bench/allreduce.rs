//! `cellfleet bench allreduce`: bus bandwidth of `GlooCollective::all_reduce_sum` on an f32 tensor
//! against Gloo's own current `gloo::allreduce` (ring algorithm) looping inside the C++ shim (no cellfleet code in its
//! timed loop), each as `--ranks` child processes over loopback TCP, at every size, in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::child::{run_measured, scratch_dir};

/// What one `bench allreduce` group runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllreduceSide {
    /// `GlooCollective::all_reduce_sum`
    Cellfleet,
    /// Gloo's `gloo::allreduce` (ring) in the shim
    GlooAllreduce,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct AllreduceChildResult {
    pub(crate) iters: usize,
    /// Seconds of each timed repetition of `iters` all-reduces.
    pub(crate) rep_seconds: Vec<f64>,
}

/// One rank of one side: connects through a directory rendezvous, checks one sum, warms up, agrees with
/// its peers on an iteration count that fills `seconds`, and times `reps` repetitions of that many
/// all-reduces.
#[allow(clippy::too_many_arguments)]
pub(crate) fn allreduce_child(
    side: AllreduceSide,
    rank: usize,
    world: usize,
    bytes: usize,
    dir: PathBuf,
    seconds: f64,
    reps: usize,
    max_iters: usize,
) -> anyhow::Result<AllreduceChildResult> {
    use crate::collective::{
        Collective, DirRendezvous, GlooCollective, GlooOptions, RendezvousStore,
    };
    use tch::{Device, Kind, Tensor};
    tch::set_num_threads(1);
    let timeout = Duration::from_secs(120);
    let store: Arc<dyn RendezvousStore> = Arc::new(DirRendezvous::new(dir));
    let options = GlooOptions {
        timeout,
        ..GlooOptions::default()
    };
    let mut gloo = GlooCollective::connect(store.clone(), "bench", rank, world, &options)?;
    let count = (bytes / 4).max(1) as i64;
    let mut tensor = Tensor::full([count], (rank + 1) as f64, (Kind::Float, Device::Cpu));
    // Seconds of `iters` all-reduces; the cellfleet side times its own loop, the baseline's loop and
    // timer are inside the shim.
    let run =
        |gloo: &mut GlooCollective, tensor: &mut Tensor, iters: usize| -> anyhow::Result<f64> {
            Ok(match side {
                AllreduceSide::Cellfleet => {
                    gloo.barrier()?;
                    let started = Instant::now();
                    for _ in 0..iters {
                        gloo.all_reduce_sum(tensor)?;
                    }
                    started.elapsed().as_secs_f64()
                }
                AllreduceSide::GlooAllreduce => gloo.baseline_allreduce(tensor, iters)?,
            })
        };
    // One checked sum, so a fast wrong answer cannot pass for bandwidth.
    run(&mut gloo, &mut tensor, 1)?;
    let expected = (world * (world + 1) / 2) as f64;
    let (lo, hi) = (
        tensor.min().double_value(&[]),
        tensor.max().double_value(&[]),
    );
    if lo != expected || hi != expected {
        bail!("{side:?} rank {rank}: all-reduce gave values in [{lo}, {hi}], expected {expected}");
    }
    let _ = tensor.zero_();
    let warm_iters = 2;
    let warm = run(&mut gloo, &mut tensor, warm_iters)?;
    let iters_key = "bench/iters";
    let iters = if rank == 0 {
        let per_iter = (warm / warm_iters as f64).max(1e-6);
        let iters = ((seconds / per_iter) as usize).clamp(2, max_iters.max(2));
        store.set(iters_key, iters.to_string().as_bytes())?;
        iters
    } else {
        String::from_utf8(store.get(iters_key, timeout)?)?.parse()?
    };
    let rep_seconds = (0..reps)
        .map(|_| run(&mut gloo, &mut tensor, iters))
        .collect::<anyhow::Result<_>>()?;
    Ok(AllreduceChildResult { iters, rep_seconds })
}

/// How `bench allreduce` measures each size.
pub(crate) struct AllreduceRounds {
    pub(crate) seconds_per_rep: f64,
    pub(crate) rounds: usize,
    pub(crate) reps: usize,
    pub(crate) max_iters: usize,
    pub(crate) ranks: usize,
}

/// Runs one group of `ranks` children on one side and size; returns the seconds per all-reduce of its
/// fastest repetition (a repetition lasts as long as its slowest rank) and the iterations per repetition.
fn allreduce_group(
    exe: &Path,
    side: AllreduceSide,
    bytes: usize,
    plan: &AllreduceRounds,
) -> anyhow::Result<(f64, usize)> {
    let dir = scratch_dir(&format!("allreduce-{side:?}-{bytes}"))?;
    let children: Vec<_> = (0..plan.ranks)
        .map(|rank| {
            let mut cmd = Command::new(exe);
            cmd.args(["bench", "allreduce-child", "--side"])
                .arg(match side {
                    AllreduceSide::Cellfleet => "cellfleet",
                    AllreduceSide::GlooAllreduce => "gloo-allreduce",
                })
                .args(["--rank", &rank.to_string()])
                .args(["--world", &plan.ranks.to_string()])
                .args(["--bytes", &bytes.to_string()])
                .args(["--seconds", &plan.seconds_per_rep.to_string()])
                .args(["--reps", &plan.reps.to_string()])
                .args(["--max-iters", &plan.max_iters.to_string()])
                .arg("--dir")
                .arg(&dir);
            std::thread::spawn(move || run_measured(&mut cmd))
        })
        .collect();
    let mut rep_seconds = vec![0.0f64; plan.reps];
    let mut iters = 0;
    for child in children {
        let run = child
            .join()
            .map_err(|_| anyhow::anyhow!("benchmark child thread panicked"))??;
        let line = run.stdout.lines().last().unwrap_or_default();
        let result: AllreduceChildResult = serde_json::from_str(line)
            .with_context(|| format!("benchmark child printed {:?}", run.stdout))?;
        for (slowest, s) in rep_seconds.iter_mut().zip(&result.rep_seconds) {
            *slowest = slowest.max(*s);
        }
        iters = result.iters;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let best = rep_seconds.iter().copied().fold(f64::INFINITY, f64::min);
    Ok((best / iters.max(1) as f64, iters))
}

pub(crate) fn bench_allreduce(sizes_mib: &[f64], plan: &AllreduceRounds) -> anyhow::Result<()> {
    if plan.ranks < 2 {
        bail!("an all-reduce benchmark needs at least 2 ranks");
    }
    let exe = std::env::current_exe()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let n = plan.ranks as f64;
    let bus_factor = 2.0 * (n - 1.0) / n;
    println!(
        "all-reduce benchmark: {} ranks (processes) over loopback TCP on {cores} cores, f32 sum; bus \
         bandwidth = bytes / time x 2(n-1)/n (GB = 1e9 bytes); best of {} rounds x {} repetitions of \
         ~{:.2} s per side and size, after a warm-up",
        plan.ranks, plan.rounds, plan.reps, plan.seconds_per_rep
    );
    println!(
        "{:>10} {:>16} {:>8} {:>16} {:>8} {:>8}",
        "size", "cellfleet GB/s", "iters", "gloo::allreduce GB/s", "iters", "ratio"
    );
    let mut ratios = Vec::new();
    for &mib in sizes_mib {
        let bytes = ((mib * 1048576.0) as usize / 4).max(1) * 4;
        let busbw = |per_iter: f64| bytes as f64 / per_iter * bus_factor / 1e9;
        let (mut ours, mut ring) = ((f64::INFINITY, 0), (f64::INFINITY, 0));
        for round in 0..plan.rounds {
            // Alternate which side goes first, so neither always runs on a warmer (or busier) machine.
            let sides = if round % 2 == 0 {
                [AllreduceSide::Cellfleet, AllreduceSide::GlooAllreduce]
            } else {
                [AllreduceSide::GlooAllreduce, AllreduceSide::Cellfleet]
            };
            for side in sides {
                let measured = allreduce_group(&exe, side, bytes, plan)?;
                let best = if side == AllreduceSide::Cellfleet {
                    &mut ours
                } else {
                    &mut ring
                };
                if measured.0 < best.0 {
                    *best = measured;
                }
            }
        }
        let ratio = busbw(ours.0) / busbw(ring.0);
        ratios.push(ratio);
        println!(
            "{:>6} MiB {:>16.3} {:>8} {:>16.3} {:>8} {:>7.2}x",
            mib,
            busbw(ours.0),
            ours.1,
            busbw(ring.0),
            ring.1,
            ratio
        );
    }
    if !ratios.is_empty() {
        let geomean = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(0.0, f64::max);
        println!(
            "ratio (cellfleet / gloo::allreduce ring) bus bandwidth: geometric mean {geomean:.2}x \
             (min {min:.2}x, max {max:.2}x over {} sizes)",
            ratios.len()
        );
    }
    Ok(())
}
