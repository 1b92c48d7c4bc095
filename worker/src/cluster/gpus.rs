//! `cellfleet worker --gpus all|N`: one worker process per local GPU (torchrun's `--nproc-per-node`),
//! each `cellfleet worker --device cuda:I` with the same coordinator and settings, supervised by this
//! process: a worker that exits is restarted (a few times), and SIGTERM or Ctrl-C stops them all.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::daemon::WorkerArgs;

/// Restarts allowed per GPU before the supervisor gives up on the node.
const MAX_RESTARTS: u32 = 3;

/// How many GPUs `--gpus SPEC` means when libtorch sees `available` CUDA devices.
pub fn gpu_count(spec: &str, available: usize) -> anyhow::Result<usize> {
    let why_none = "libtorch sees no CUDA device on this machine (a CPU-only libtorch, no NVIDIA driver, or \
                    CUDA_VISIBLE_DEVICES hides them); on a CPU machine run one worker with --device cpu";
    let wanted = match spec {
        "all" => {
            if available == 0 {
                bail!("--gpus all: {why_none}");
            }
            available
        }
        n => match n.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => bail!("--gpus takes `all` or a positive number of GPUs, got {spec:?}"),
        },
    };
    if available == 0 {
        bail!("--gpus {spec}: {why_none}");
    }
    if wanted > available {
        bail!("--gpus {spec}: libtorch sees only {available} CUDA device(s) here");
    }
    Ok(wanted)
}

/// The metrics address of worker `index`: the given port plus `index`.
fn metrics_address(base: &str, index: usize) -> anyhow::Result<String> {
    let (host, port) = base
        .rsplit_once(':')
        .with_context(|| format!("--metrics-listen {base} is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--metrics-listen {base}: {port} is not a port"))?;
    if port == 0 {
        return Ok(base.to_string());
    }
    let port = port.checked_add(index as u16).with_context(|| {
        format!("--metrics-listen {base}: port {port} + {index} is out of range")
    })?;
    Ok(format!("{host}:{port}"))
}

fn spawn(args: &WorkerArgs, index: usize) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the cellfleet binary")?;
    let mut command = Command::new(exe);
    command
        .arg("worker")
        .args(["--coordinator", &args.coordinator])
        .args(["--device", &format!("cuda:{index}")])
        .args(["--threads", &args.threads.to_string()])
        .args(["--advertise-host", &args.advertise_host])
        .args(["--reconnect-timeout", &args.reconnect_timeout.to_string()]);
    if let Some(base) = &args.metrics_listen {
        command.args(["--metrics-listen", &metrics_address(base, index)?]);
    }
    // TLS paths and the token file travel as environment variables (never secrets on a command line).
    for (name, value) in crate::link::child_environment() {
        command.env(name, value);
    }
    command
        .spawn()
        .with_context(|| format!("cannot start the worker for cuda:{index}"))
}

fn terminate(children: &mut [(usize, Child, u32)]) {
    for (_, child, _) in children.iter() {
        // SIGTERM first, so that a worker can leave its generation cleanly.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (_, child, _) in children.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts and supervises the node's workers until a signal, or until one keeps failing.
pub fn supervise(args: &WorkerArgs, spec: &str) -> anyhow::Result<()> {
    let available = tch::Cuda::device_count().max(0) as usize;
    let count = gpu_count(spec, available)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signals::SIGINT, signals::SIGTERM] {
        signals::flag_on(signal, stop.clone())?;
    }
    let mut children = Vec::with_capacity(count);
    for index in 0..count {
        children.push((index, spawn(args, index)?, 0u32));
    }
    eprintln!(
        "started {count} workers (cuda:0..cuda:{}) for {}",
        count - 1,
        args.coordinator
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        for (index, child, restarts) in children.iter_mut() {
            let Some(status) = child.try_wait()? else {
                continue;
            };
            if *restarts >= MAX_RESTARTS {
                let index = *index;
                terminate(&mut children);
                bail!("the worker on cuda:{index} exited ({status}) after {MAX_RESTARTS} restarts; stopping this node's workers");
            }
            *restarts += 1;
            eprintln!(
                "the worker on cuda:{index} exited ({status}); restarting it ({} of {MAX_RESTARTS})",
                restarts
            );
            std::thread::sleep(Duration::from_secs(2));
            *child = spawn(args, *index)?;
        }
    }
    eprintln!("stopping {count} workers");
    terminate(&mut children);
    Ok(())
}

/// Sets a flag when a signal arrives, with `sigaction` (no extra crate for two signals).
mod signals {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};

    pub const SIGINT: i32 = libc::SIGINT;
    pub const SIGTERM: i32 = libc::SIGTERM;

    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

    extern "C" fn on_signal(_: libc::c_int) {
        // Only an atomic store: async-signal-safe.
        if let Some(flag) = FLAG.get() {
            flag.store(true, Ordering::Relaxed);
        }
    }

    pub fn flag_on(signal: i32, flag: Arc<AtomicBool>) -> anyhow::Result<()> {
        let _ = FLAG.set(flag);
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic.
        let result = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if result != 0 {
            anyhow::bail!("cannot install a handler for signal {signal}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_counts_are_checked_against_what_libtorch_sees() {
        assert_eq!(gpu_count("all", 8).unwrap(), 8);
        assert_eq!(gpu_count("2", 8).unwrap(), 2);
        let none = gpu_count("all", 0).unwrap_err().to_string();
        assert!(
            none.contains("no CUDA device") && none.contains("--device cpu"),
            "{none}"
        );
        assert!(gpu_count("2", 0)
            .unwrap_err()
            .to_string()
            .contains("no CUDA device"));
        assert!(gpu_count("9", 8)
            .unwrap_err()
            .to_string()
            .contains("only 8"));
        assert!(gpu_count("0", 8)
            .unwrap_err()
            .to_string()
            .contains("positive"));
        assert!(gpu_count("some", 8)
            .unwrap_err()
            .to_string()
            .contains("positive"));
    }

    #[test]
    fn metrics_ports_step_by_worker() {
        assert_eq!(metrics_address("0.0.0.0:9465", 3).unwrap(), "0.0.0.0:9468");
        assert_eq!(metrics_address("[::]:0", 3).unwrap(), "[::]:0");
        assert!(metrics_address("0.0.0.0:65535", 1).is_err());
    }
}
