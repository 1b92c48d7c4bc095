//! `cellfleet ckpt ls|show|verify|export`: look into a run's checkpoints without training.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cellfleet_shared::checkpoint::{step_folder, CheckpointManifest, Checkpoints};
use cellfleet_shared::storage::S3Options;
use clap::Subcommand;

use crate::train::checkpoint_state::{open_existing_run, read_state, split_step_url};
use crate::train::saved_model::export_checkpoint;

#[derive(Subcommand, Debug)]
pub enum CkptAction {
    /// List a run's checkpoints (manifests only; `verify` checks the data)
    Ls {
        /// The run's checkpoint location (a directory, file://PATH or s3://BUCKET/PREFIX)
        url: String,
    },
    /// Print one checkpoint's manifest and training state
    Show {
        /// A run location (its newest checkpoint) or one step-NNNNNNNNNNNN folder
        url: String,
        /// The step (default: the one in the URL, else the newest)
        #[arg(long)]
        step: Option<u64>,
    },
    /// Re-read every object and check its size and content hash against the manifest
    Verify {
        /// A run location (every checkpoint) or one step-NNNNNNNNNNNN folder
        url: String,
        /// Only this step
        #[arg(long)]
        step: Option<u64>,
    },
    /// Write a checkpoint's weights as a plain safetensors file (with model.json beside it), loadable by
    /// `safetensors.torch.load_file` and by `cellfleet eval --weights`
    Export {
        /// A run location (its newest valid checkpoint) or one step-NNNNNNNNNNNN folder
        url: String,
        #[arg(long)]
        step: Option<u64>,
        /// The weights file to write (model.json is written in the same directory)
        #[arg(long)]
        out: PathBuf,
    },
}

fn locate(
    url: &str,
    step: Option<u64>,
    s3: &S3Options,
) -> anyhow::Result<(Checkpoints, Option<u64>)> {
    let (run, in_url) = split_step_url(url);
    if let (Some(a), Some(b)) = (step, in_url) {
        if a != b {
            bail!("--step {a} contradicts the URL's {}", step_folder(b));
        }
    }
    Ok((open_existing_run(&run, s3)?, step.or(in_url)))
}

/// The manifest of `step`, or of the newest checkpoint with a manifest.
fn manifest_of(checkpoints: &Checkpoints, step: Option<u64>) -> anyhow::Result<CheckpointManifest> {
    if let Some(step) = step {
        return checkpoints
            .manifest(step)?
            .map_err(|p| anyhow::anyhow!("{p}"));
    }
    for step in checkpoints.committed_steps()? {
        if let Ok(manifest) = checkpoints.manifest(step)? {
            return Ok(manifest);
        }
    }
    bail!("no committed checkpoint in {}", checkpoints.url())
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn ckpt_command(action: CkptAction, s3: &S3Options) -> anyhow::Result<()> {
    match action {
        CkptAction::Ls { url } => ls(&url, s3),
        CkptAction::Show { url, step } => show(&url, step, s3),
        CkptAction::Verify { url, step } => verify(&url, step, s3),
        CkptAction::Export { url, step, out } => export(&url, step, &out, s3),
    }
}

/// Lists a run's checkpoint folders with their sizes, world size, generation, save time and status.
fn ls(url: &str, s3: &S3Options) -> anyhow::Result<()> {
    let (checkpoints, _) = locate(url, None, s3)?;
    let latest = checkpoints.latest_pointer()?;
    let steps = checkpoints.steps()?;
    if steps.is_empty() {
        println!("no checkpoints in {}", checkpoints.url());
        return Ok(());
    }
    println!(
        "{:>12}  {:>10}  {:>10}  {:>5}  {:>5}  {:<20}  status",
        "step", "raw", "stored", "world", "gen", "saved (UTC)"
    );
    for step in steps {
        let marker = if latest == Some(step) {
            "  <- latest"
        } else {
            ""
        };
        let status = if latest.is_some_and(|l| step > l) {
            "not committed (above latest)"
        } else {
            "committed"
        };
        match checkpoints.manifest(step)? {
            Ok(m) => {
                let raw: u64 = m.objects.iter().map(|o| o.raw_bytes).sum();
                let field = |k: &str| m.meta.get(k).and_then(|v| v.as_u64());
                println!(
                    "{:>12}  {:>10}  {:>10}  {:>5}  {:>5}  {:<20}  {status}{marker}",
                    step,
                    mb(raw),
                    mb(m.stored_bytes()),
                    field("world_size").map_or("-".into(), |v| v.to_string()),
                    field("generation").map_or("-".into(), |v| v.to_string()),
                    field("saved_unix_ms").map_or("-".into(), utc),
                );
            }
            Err(problem) => println!(
                "{:>12}  {:>10}  {:>10}  {:>5}  {:>5}  {:<20}  incomplete: {}{marker}",
                step, "-", "-", "-", "-", "-", problem.what
            ),
        }
    }
    Ok(())
}

/// Prints one checkpoint's state and objects.
fn show(url: &str, step: Option<u64>, s3: &S3Options) -> anyhow::Result<()> {
    let (checkpoints, step) = locate(url, step, s3)?;
    let manifest = manifest_of(&checkpoints, step)?;
    let state = read_state(&checkpoints, &manifest)?;
    println!(
        "checkpoint {}/{}",
        checkpoints.url().trim_end_matches('/'),
        step_folder(manifest.step)
    );
    println!(
        "  step {} of {} (optimizer step {}, next lr {:.3e}), epoch {} position {} of {}",
        state.step,
        state.config.steps,
        state.optimizer_step,
        state.next_lr,
        state.epoch,
        state.position,
        state.epoch_len
    );
    println!(
        "  model: {:?} preset, d_model {}, {} layers, {} genes, {} bins, {} experts",
        state.config.preset,
        state.model.d_model,
        state.model.n_layers,
        state.model.n_genes,
        state.model.n_bins,
        state.model.experts()
    );
    println!(
        "  run: seed {}, batch {}, lr {}, world size {}, generation {}",
        state.config.seed,
        state.config.batch_size,
        state.config.lr,
        state.world_size,
        state.generation
    );
    println!(
        "  corpus: {} (manifest {})",
        state.corpus_url,
        &state.corpus_manifest_blake3[..state.corpus_manifest_blake3.len().min(16)]
    );
    println!(
        "  saved: {} UTC; RNG: {}",
        utc(state.saved_unix_ms),
        state.rng_scheme
    );
    println!("  objects:");
    for o in &manifest.objects {
        println!(
            "    {:<24} {:>10} raw {:>10} stored  blake3 {}",
            o.name,
            mb(o.raw_bytes),
            mb(o.stored_bytes),
            o.blake3.get(..16).unwrap_or(&o.blake3)
        );
    }
    Ok(())
}

/// Re-hashes a run's committed checkpoints (or one).
fn verify(url: &str, step: Option<u64>, s3: &S3Options) -> anyhow::Result<()> {
    let (checkpoints, step) = locate(url, step, s3)?;
    // A run's committed checkpoints are checked; folders above `latest` (a save in progress, or
    // abandoned) are only mentioned, as they are never read.
    let steps = match step {
        Some(step) => vec![step],
        None => {
            let committed = checkpoints.committed_steps()?;
            for other in checkpoints.steps()? {
                if !committed.contains(&other) {
                    println!(
                        "{}: not committed (a save in progress or abandoned), skipped",
                        step_folder(other)
                    );
                }
            }
            committed.into_iter().rev().collect()
        }
    };
    if steps.is_empty() {
        bail!("no committed checkpoints in {}", checkpoints.url());
    }
    let mut bad = Vec::new();
    for step in &steps {
        let started = std::time::Instant::now();
        let problems = checkpoints.verify(*step)?;
        if problems.is_empty() {
            println!(
                "{}: ok ({:.2}s)",
                step_folder(*step),
                started.elapsed().as_secs_f64()
            );
        } else {
            bad.push(step_folder(*step));
            for problem in problems {
                println!(
                    "{}: {}: {}",
                    step_folder(*step),
                    problem.object,
                    problem.what
                );
            }
        }
    }
    if !bad.is_empty() {
        // A `latest` that names a step with no folder is the damage, not that step.
        let dangling = match checkpoints.latest_pointer()? {
            Some(latest) if step.is_none() && !checkpoints.steps()?.contains(&latest) => format!(
                " (`latest` names {}, which has no folder: `latest` is damaged or was moved by hand)",
                step_folder(latest)
            ),
            _ => String::new(),
        };
        bail!(
            "{} of {} checkpoints have problems: {}{dangling}",
            bad.len(),
            steps.len(),
            bad.join(", ")
        );
    }
    Ok(())
}

/// Exports a checkpoint's weights and `model.json` (the newest valid one unless a step is named).
fn export(url: &str, step: Option<u64>, out: &Path, s3: &S3Options) -> anyhow::Result<()> {
    let (checkpoints, step) = locate(url, step, s3)?;
    let manifest = match step {
        Some(step) => {
            let problems = checkpoints.verify(step)?;
            if let Some(p) = problems.first() {
                bail!("cannot export: {p}");
            }
            manifest_of(&checkpoints, Some(step))?
        }
        None => {
            let (newest, skipped) = checkpoints.newest_valid()?;
            for p in &skipped {
                eprintln!("warning: skipping {p}");
            }
            newest.with_context(|| format!("no valid checkpoint in {}", checkpoints.url()))?
        }
    };
    let exported = export_checkpoint(&checkpoints, &manifest, out)?;
    println!(
        "exported step {} ({:.1} MB of weights) to {} and {}",
        manifest.step,
        exported.weights_bytes as f64 / 1e6,
        out.display(),
        exported.info_path.display()
    );
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` of a Unix time in milliseconds.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_237_691_825), "2026-11-21 05:08:11");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
    }
}
