//! Running a benchmark's child processes (peak memory and wall time of each) and the places they read
//! and write: the Python baselines' folder and scratch directories.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

/// Peak resident memory (MiB) and wall time of a child process.
pub(crate) struct ChildRun {
    pub(crate) seconds: f64,
    /// User + system CPU seconds of the child (its own threads included).
    pub(crate) cpu_seconds: f64,
    pub(crate) peak_mib: f64,
    pub(crate) stdout: String,
}

/// CPU seconds every core of this machine has spent busy since boot (user, nice, system, interrupts
/// and steal from `/proc/stat`): the work of every process and of the kernel's own threads, such as
/// writing dirty pages back, which no process's own CPU time includes.
pub(crate) fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no `cpu` line")?;
    // user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy.
    let jiffies: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let busy: u64 = jiffies
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4 && i < 8)
        .map(|(_, &j)| j)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy as f64 / ticks)
}

/// Runs `cmd`, then writes every dirty page back (`sync`), and returns the machine's busy CPU seconds
/// over both with the child's own measurement: the conversion's whole cost, whoever pays it.
pub(crate) fn run_measured_with_writeback(cmd: &mut Command) -> anyhow::Result<(ChildRun, f64)> {
    // Earlier work's dirty pages are not this child's.
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let before = machine_busy_seconds()?;
    let run = run_measured(cmd)?;
    // SAFETY: as above.
    unsafe { libc::sync() };
    Ok((run, machine_busy_seconds()? - before))
}

pub(crate) fn run_measured(cmd: &mut Command) -> anyhow::Result<ChildRun> {
    use std::io::Read;
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot start benchmark child")?;
    let pid = child.id() as libc::pid_t;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    // wait4 (not Child::wait) because it also returns the child's own peak memory.
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    if reaped != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("benchmark child {cmd:?} failed:\n{stderr}");
    }
    let cpu = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Ok(ChildRun {
        seconds,
        cpu_seconds: cpu(usage.ru_utime) + cpu(usage.ru_stime),
        peak_mib: usage.ru_maxrss as f64 / 1024.0,
        stdout,
    })
}

/// The median (the mean of the middle two for an even count), lowest and highest of `values` (at
/// least one).
pub(crate) fn median_range(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

/// Per round, `ours[r] / theirs[r]`.
pub(crate) fn round_ratios(ours: &[f64], theirs: &[f64]) -> Vec<f64> {
    ours.iter().zip(theirs).map(|(a, b)| a / b).collect()
}

pub(crate) fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

pub(crate) fn bench_dir() -> PathBuf {
    // The scripts live in the source tree's bench/ folder.
    let candidates = [
        PathBuf::from("bench"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench"),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("ingest_baseline.py").is_file())
        .unwrap_or_else(|| PathBuf::from("bench"))
}

pub(crate) fn scratch_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cellfleet-bench-{}-{name}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
