//! The seeded mutation suite: real files with random bytes overwritten (and hostile values written into
//! their structured fields), given to the real `cellfleet` commands that read them. Every mutant must be
//! either accepted or refused with exactly one `error:` line that names what is damaged: never a crash, a
//! panic or a hang, and a refused run leaves no corpus manifest or checkpoint `latest` pointer behind.
//!
//! Kinds: h5ad files (`ingest`), corpus shards with the manifest's size and hash rewritten to match, as a
//! hostile store could (`corpus verify`, which decodes every block), corpus manifests (`corpus verify`),
//! checkpoints (manifests, objects with their hashes rewritten, `latest`; `ckpt verify` and `ckpt export`,
//! and `train --resume latest` for some), and screen unit results (decoded and merged against their plan,
//! as `screen results` does). Each test prints its counts; `CELLFLEET_MUTANTS_SCALE=N` multiplies them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cellfleet_e2e::{cellfleet_ok, data};
use cellfleet_shared::hostile::SeededRng as Rng;
use serde_json::Value;

/// The binary under test: this build's, or `CELLFLEET_MUTATION_BIN` (to count an older build's
/// failures on the same mutants).
fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var_os("CELLFLEET_MUTATION_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cellfleet")))
    })
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// How many mutants of a kind run: `base` times `CELLFLEET_MUTANTS_SCALE` (default 1). The bases keep
/// 1,000 mutants (120 h5ad, 250 shards, 200 manifests, 130 checkpoints, 300 unit results) in a few minutes
/// of CI; a larger scale is a longer audit.
fn mutants(base: usize) -> usize {
    let scale: usize = std::env::var("CELLFLEET_MUTANTS_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    base * scale
}

/// What ingest says when the h5ad reader child died inside HDF5: a crash it contained.
const CONTAINED_CRASH: &str = "HDF5 library crashed";

/// A command is a hang when it runs this long on inputs of a few megabytes.
const HANG: Duration = Duration::from_secs(60);

/// Overwrites 1-64 bytes (a run, scattered bytes, or a run of 0xff / 0x00, the shapes that make length
/// fields huge or zero), or truncates; says what it did.
fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>) -> String {
    let len = bytes.len();
    let n = 1 + rng.below(64).min(len - 1);
    match rng.below(10) {
        0..=3 => {
            let at = rng.below(len - n + 1);
            for b in &mut bytes[at..at + n] {
                *b = rng.next_u64() as u8;
            }
            format!("{n} random bytes at {at}")
        }
        4..=6 => {
            for _ in 0..n {
                let at = rng.below(len);
                bytes[at] = rng.next_u64() as u8;
            }
            format!("{n} scattered random bytes")
        }
        7 => {
            let at = rng.below(len - n + 1);
            bytes[at..at + n].fill(0xff);
            format!("{n} bytes of 0xff at {at}")
        }
        8 => {
            let at = rng.below(len - n + 1);
            bytes[at..at + n].fill(0);
            format!("{n} zero bytes at {at}")
        }
        _ => {
            let keep = rng.below(len);
            bytes.truncate(keep);
            format!("truncated to {keep} bytes")
        }
    }
}

/// Replaces one value of a JSON document with a hostile one (huge, negative, empty, a path outside the
/// root, a wrong type), the edits a byte mutation rarely makes and a hostile store can.
fn mutate_json(rng: &mut Rng, doc: &mut Value) -> String {
    fn leaves(value: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    path.push(k.clone());
                    out.push(path.clone());
                    leaves(v, path, out);
                    path.pop();
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate().take(8) {
                    path.push(i.to_string());
                    out.push(path.clone());
                    leaves(v, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut paths = Vec::new();
    leaves(doc, &mut Vec::new(), &mut paths);
    let path = &paths[rng.below(paths.len())];
    let hostile = [
        serde_json::json!(u64::MAX),
        serde_json::json!(4_294_967_295u64),
        serde_json::json!(1u64 << 40),
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(1e300),
        serde_json::json!(""),
        serde_json::json!("../../../../etc/passwd"),
        serde_json::json!([]),
        serde_json::json!({}),
        Value::Null,
        serde_json::json!("ä".repeat(3)),
    ];
    let value = hostile[rng.below(hostile.len())].clone();
    let mut at = &mut *doc;
    for key in path {
        at = match at {
            Value::Object(map) => map.get_mut(key).unwrap(),
            Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
            _ => unreachable!("a path runs through containers"),
        };
    }
    let text = format!("{} = {value}", path.join("."));
    *at = value;
    text
}

/// What a command did with a mutant.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Accepted,
    Refused,
    /// Killed by a signal (or an abort): the case this suite exists for.
    Crashed(String),
    Panicked(String),
    Hung,
    /// Refused, but not with one `error:` line naming the subject.
    Unclear(String),
    /// Refused, and left a manifest or a `latest` pointer behind.
    LeftBehind(String),
}

/// Runs `cellfleet ARGS` with the hang limit; classifies the result. `subject` must appear in the one
/// `error:` line of a refusal.
fn run_mutant(args: &[String], subject: &str, scratch: &Path) -> (Outcome, String) {
    std::fs::create_dir_all(scratch).unwrap();
    let stderr_path = scratch.join("stderr");
    let mut child = Command::new(bin())
        .args(args)
        .env("CELLFLEET_QUIET", "1")
        .env("RUST_BACKTRACE", "0")
        // A read that HDF5 loops on is stopped by the reader well before the suite calls it a hang.
        .env("CELLFLEET_H5AD_TIMEOUT_SECS", "20")
        // The real files are megabytes: a mutant that claims more is refused at 1 GiB, so that the suite
        // never holds gigabytes beside the tests running next to it.
        .env("CELLFLEET_H5AD_MAX_READ_GIB", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("cellfleet starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let Some(status) = status else {
        return (Outcome::Hung, stderr);
    };
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        return (Outcome::Crashed(format!("signal {signal}")), stderr);
    }
    if stderr.contains("panicked") {
        return (Outcome::Panicked(last_line(&stderr)), stderr);
    }
    if status.success() {
        return (Outcome::Accepted, stderr);
    }
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    let outcome = if errors.len() != 1 {
        Outcome::Unclear(format!("{} error lines", errors.len()))
    } else if !errors[0].contains(subject) {
        Outcome::Unclear(format!("does not name {subject}"))
    } else {
        Outcome::Refused
    };
    (outcome, stderr)
}

fn last_line(text: &str) -> String {
    text.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

/// Counts of one kind of input, with a few examples of every outcome that is not allowed.
#[derive(Default)]
struct Tally {
    accepted: usize,
    refused: usize,
    crashed: usize,
    panicked: usize,
    hung: usize,
    unclear: usize,
    left_behind: usize,
    /// Refusals that say the HDF5 library crashed: a crash the reader child contained.
    contained_crashes: usize,
    failures: Vec<String>,
    /// A few refusals, to show what a user reads.
    refusals: Vec<String>,
}

impl Tally {
    fn add(&mut self, what: &str, outcome: Outcome, stderr: &str) {
        let bad = match &outcome {
            Outcome::Accepted => {
                self.accepted += 1;
                false
            }
            Outcome::Refused => {
                self.refused += 1;
                if stderr.contains(CONTAINED_CRASH) {
                    self.contained_crashes += 1;
                }
                if self.refusals.len() < 4 {
                    self.refusals.push(last_line(stderr));
                }
                false
            }
            Outcome::Crashed(_) => {
                self.crashed += 1;
                true
            }
            Outcome::Panicked(_) => {
                self.panicked += 1;
                true
            }
            Outcome::Hung => {
                self.hung += 1;
                true
            }
            Outcome::Unclear(_) => {
                self.unclear += 1;
                true
            }
            Outcome::LeftBehind(_) => {
                self.left_behind += 1;
                true
            }
        };
        if bad && self.failures.len() < 12 {
            self.failures.push(format!(
                "{what}: {outcome:?}; stderr: {}",
                stderr
                    .trim()
                    .lines()
                    .take(6)
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
    }

    /// Prints the counts and asserts that nothing crashed, panicked, hung, was unclear or left state.
    fn report(&self, kind: &str) {
        let total = self.accepted
            + self.refused
            + self.crashed
            + self.panicked
            + self.hung
            + self.unclear
            + self.left_behind;
        println!(
            "MUTANTS {kind}: {total} | refused {} (of them a contained HDF5 crash: {}) | accepted {} | crashed {} | panicked {} | hung {} | unclear error {} | left a manifest/latest {}",
            self.refused,
            self.contained_crashes,
            self.accepted,
            self.crashed,
            self.panicked,
            self.hung,
            self.unclear,
            self.left_behind
        );
        for refusal in &self.refusals {
            println!("  e.g. {refusal}");
        }
        for failure in &self.failures {
            println!("  FAILURE {failure}");
        }
        assert!(
            self.failures.is_empty(),
            "{kind}: {} mutants crashed, panicked, hung, were refused unclearly or left state behind:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
        assert!(
            self.refused > 0,
            "{kind}: no mutant was refused; the mutations do nothing"
        );
    }
}

/// Runs `make(i)` for mutants `0..count` on two threads; each returns (description, outcome, stderr).
fn run_all(count: usize, make: impl Fn(usize) -> (String, Outcome, String) + Sync) -> Tally {
    let next = AtomicUsize::new(0);
    let tally = Mutex::new(Tally::default());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let (what, outcome, stderr) = make(i);
                tally.lock().unwrap().add(&what, outcome, &stderr);
            });
        }
    });
    tally.into_inner().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn damaged_h5ad_files_are_refused_with_one_clear_error_and_never_crash_ingest() {
    let dir = tempfile::tempdir().unwrap();
    // Every encoding real files use: modern CSR with layers, legacy sparse, legacy dense scaled with raw,
    // legacy dense counts.
    let files = [
        "norman_subset.h5ad",
        "kang_ifnb_pbmc.h5ad",
        "pbmc68k_reduced.h5ad",
        "pbmc5k_citeseq_counts.h5ad",
    ];
    let originals: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(data(f)).unwrap())
        .collect();
    let per_file = mutants(30);
    let tally = run_all(files.len() * per_file, |i| {
        let file = i % files.len();
        let mut rng = Rng(0x4835_6164 ^ i as u64);
        let mut bytes = originals[file].clone();
        let how = mutate_bytes(&mut rng, &mut bytes);
        let scratch = dir.path().join(format!("m{i}"));
        std::fs::create_dir_all(&scratch).unwrap();
        let name = format!("mutant-{i}-{}", files[file]);
        let input = scratch.join(&name);
        std::fs::write(&input, &bytes).unwrap();
        let out = scratch.join("corpus");
        let args = [
            "ingest".to_string(),
            s(&input),
            "--out".into(),
            s(&out),
            "--hvg".into(),
            "32".into(),
            "--threads".into(),
            "1".into(),
        ];
        let (mut outcome, stderr) = run_mutant(&args, &name, &scratch);
        if outcome != Outcome::Accepted && out.join("manifest.json").exists() {
            outcome = Outcome::LeftBehind("manifest.json".into());
        }
        let what = format!("{name} ({how})");
        // To replay the same mutants through another HDF5 (docs/corpus.md): keep them with their outcome.
        if let Some(keep) = std::env::var_os("CELLFLEET_MUTANTS_KEEP").map(PathBuf::from) {
            std::fs::create_dir_all(&keep).unwrap();
            std::fs::copy(&input, keep.join(&name)).unwrap();
            let outcome = match &outcome {
                Outcome::Refused if stderr.contains(CONTAINED_CRASH) => "hdf5_crash".into(),
                other => format!("{other:?}"),
            };
            std::fs::write(keep.join(format!("{name}.outcome")), outcome).unwrap();
        }
        std::fs::remove_dir_all(&scratch).unwrap();
        (what, outcome, stderr)
    });
    tally.report("h5ad");
}

/// Kang's 1,975 cells over 64 genes in 4 shards of 8 blocks: the corpus the shard and manifest mutants
/// start from.
fn small_corpus(dir: &Path) -> PathBuf {
    let out = dir.join("corpus");
    cellfleet_ok(
        bin(),
        &[
            "ingest",
            data("kang_ifnb_pbmc.h5ad").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--hvg",
            "64",
            "--shard-cells",
            "512",
            "--block-cells",
            "64",
        ],
    );
    out
}

#[test]
fn damaged_shards_whose_hashes_were_rewritten_are_refused_by_the_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(corpus.join("manifest.json")).unwrap()).unwrap();
    let shards: Vec<String> = manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    let tally = run_all(mutants(250), |i| {
        let mut rng = Rng(0x5348_4152 ^ i as u64);
        let copy = dir.path().join(format!("m{i}"));
        copy_dir(&corpus, &copy);
        let index = rng.below(shards.len());
        let shard = copy.join(&shards[index]);
        let mut bytes = std::fs::read(&shard).unwrap();
        let how = mutate_bytes(&mut rng, &mut bytes);
        std::fs::write(&shard, &bytes).unwrap();
        // The hostile store rewrites the manifest too, so the hash check passes and the decoder decides.
        let mut doc = manifest.clone();
        doc["shards"][index]["bytes"] = serde_json::json!(bytes.len());
        doc["shards"][index]["blake3"] =
            serde_json::json!(blake3::hash(&bytes).to_hex().to_string());
        std::fs::write(
            copy.join("manifest.json"),
            serde_json::to_vec_pretty(&doc).unwrap(),
        )
        .unwrap();
        let args = ["corpus".to_string(), "verify".into(), s(&copy)];
        let (outcome, stderr) = run_mutant(&args, &shards[index], &copy.join("scratch"));
        std::fs::remove_dir_all(&copy).unwrap();
        (format!("{} ({how})", shards[index]), outcome, stderr)
    });
    tally.report("shards");
}

#[test]
fn damaged_corpus_manifests_are_refused_with_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let original = std::fs::read(corpus.join("manifest.json")).unwrap();
    let tally = run_all(mutants(200), |i| {
        let mut rng = Rng(0x4d41_4e49 ^ i as u64);
        let copy = dir.path().join(format!("m{i}"));
        copy_dir(&corpus, &copy);
        let (bytes, how) = if i % 2 == 0 {
            let mut bytes = original.clone();
            let how = mutate_bytes(&mut rng, &mut bytes);
            (bytes, how)
        } else {
            let mut doc: Value = serde_json::from_slice(&original).unwrap();
            let how = mutate_json(&mut rng, &mut doc);
            (serde_json::to_vec(&doc).unwrap(), how)
        };
        std::fs::write(copy.join("manifest.json"), &bytes).unwrap();
        let args = ["corpus".to_string(), "verify".into(), s(&copy)];
        let (outcome, stderr) = run_mutant(&args, "manifest.json", &copy.join("scratch"));
        // An edit of a cell count or a name can make a different valid corpus; an edit the decoder
        // catches in a shard names that shard instead of the manifest.
        let outcome = match outcome {
            Outcome::Unclear(why) if stderr.contains("shard") => {
                if stderr.lines().filter(|l| l.starts_with("error:")).count() == 1 {
                    Outcome::Refused
                } else {
                    Outcome::Unclear(why)
                }
            }
            other => other,
        };
        std::fs::remove_dir_all(&copy).unwrap();
        (format!("manifest.json ({how})"), outcome, stderr)
    });
    tally.report("corpus manifests");
}

/// A tiny model trained 10 steps on pbmc68k with checkpoints at steps 5 and 10.
fn checkpointed_run(dir: &Path) -> (PathBuf, PathBuf) {
    let corpus = dir.join("corpus");
    cellfleet_ok(
        bin(),
        &[
            "ingest",
            data("pbmc68k_reduced.h5ad").to_str().unwrap(),
            "--out",
            corpus.to_str().unwrap(),
            "--hvg",
            "32",
            "--label-col",
            "bulk_labels",
        ],
    );
    let ckpt = dir.join("ckpt");
    cellfleet_ok(
        bin(),
        &[
            "train",
            "--corpus",
            corpus.to_str().unwrap(),
            "--local",
            "--preset",
            "tiny",
            "--steps",
            "10",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--out",
            dir.join("out").to_str().unwrap(),
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--checkpoint-every",
            "5",
        ],
    );
    (corpus, ckpt)
}

#[test]
fn damaged_checkpoints_are_refused_or_skipped_and_leave_no_latest_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (corpus, ckpt) = checkpointed_run(dir.path());
    let step = "step-000000000010";
    let manifest_bytes = std::fs::read(ckpt.join(step).join("manifest.json")).unwrap();
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let objects: Vec<String> = manifest["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap().to_string())
        .collect();
    let resumes = AtomicUsize::new(0);
    let tally = run_all(mutants(130), |i| {
        let mut rng = Rng(0x434b_5054 ^ i as u64);
        let copy = dir.path().join(format!("m{i}"));
        copy_dir(&ckpt, &copy);
        let (subject, how) = match i % 5 {
            0 | 1 => {
                // An object, with the manifest's size and hash rewritten to match.
                let index = rng.below(objects.len());
                let path = copy.join(step).join(format!("{}.zst", objects[index]));
                let mut bytes = std::fs::read(&path).unwrap();
                let how = mutate_bytes(&mut rng, &mut bytes);
                std::fs::write(&path, &bytes).unwrap();
                let mut doc = manifest.clone();
                doc["objects"][index]["stored_bytes"] = serde_json::json!(bytes.len());
                doc["objects"][index]["blake3"] =
                    serde_json::json!(blake3::hash(&bytes).to_hex().to_string());
                std::fs::write(
                    copy.join(step).join("manifest.json"),
                    serde_json::to_vec_pretty(&doc).unwrap(),
                )
                .unwrap();
                (objects[index].clone(), how)
            }
            2 => {
                let mut bytes = manifest_bytes.clone();
                let how = mutate_bytes(&mut rng, &mut bytes);
                std::fs::write(copy.join(step).join("manifest.json"), &bytes).unwrap();
                ("manifest.json".to_string(), how)
            }
            3 => {
                let mut doc = manifest.clone();
                let how = mutate_json(&mut rng, &mut doc);
                std::fs::write(
                    copy.join(step).join("manifest.json"),
                    serde_json::to_vec(&doc).unwrap(),
                )
                .unwrap();
                ("manifest.json".to_string(), how)
            }
            _ => {
                let mut bytes = std::fs::read(copy.join("latest")).unwrap();
                let how = mutate_bytes(&mut rng, &mut bytes);
                std::fs::write(copy.join("latest"), &bytes).unwrap();
                ("latest".to_string(), how)
            }
        };
        let latest_before = std::fs::read(copy.join("latest")).unwrap();
        let scratch = copy.join("scratch");
        let export = scratch.join("weights.safetensors");
        // Export decodes the weights; verify reads every object of every step.
        let commands: Vec<Vec<String>> = vec![
            vec![
                "ckpt".into(),
                "export".into(),
                s(&copy.join(step)),
                "--out".into(),
                s(&export),
            ],
            vec!["ckpt".into(), "verify".into(), s(&copy)],
        ];
        let mut worst = (Outcome::Accepted, String::new());
        for args in commands {
            // Both commands name the damaged checkpoint (its step folder) in their one error line.
            let expect = step.to_string();
            let (outcome, stderr) = run_mutant(&args, &expect, &scratch);
            let outcome = match outcome {
                // A damaged `latest` is not needed to verify steps by their folders.
                Outcome::Unclear(_) if subject == "latest" && stderr.contains("latest") => {
                    Outcome::Refused
                }
                other => other,
            };
            if !matches!(outcome, Outcome::Accepted | Outcome::Refused) {
                worst = (outcome, stderr);
                break;
            }
            if outcome == Outcome::Refused {
                worst = (outcome, stderr);
            }
        }
        // Some mutants go through a real resume: it falls back to step 5 or refuses, and a refusal
        // moves nothing.
        if matches!(worst.0, Outcome::Accepted | Outcome::Refused) && i % 25 == 0 {
            resumes.fetch_add(1, Ordering::Relaxed);
            let args: Vec<String> = [
                "train",
                "--corpus",
                corpus.to_str().unwrap(),
                "--local",
                "--threads",
                "1",
                "--out",
                scratch.join("resumed").to_str().unwrap(),
                "--checkpoint",
                copy.to_str().unwrap(),
                "--resume",
                "latest",
                "--steps",
                "12",
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            let (outcome, stderr) = run_mutant(&args, "", &scratch);
            let latest_after = std::fs::read(copy.join("latest")).unwrap_or_default();
            worst = match outcome {
                Outcome::Refused | Outcome::Unclear(_) if latest_after != latest_before => (
                    Outcome::LeftBehind(format!(
                        "latest moved to {}",
                        String::from_utf8_lossy(&latest_after)
                    )),
                    stderr,
                ),
                Outcome::Accepted | Outcome::Refused => worst,
                other => (other, stderr),
            };
        }
        std::fs::remove_dir_all(&copy).unwrap();
        (format!("{subject} ({how})"), worst.0, worst.1)
    });
    println!("({} of them also resumed training)", resumes.into_inner());
    tally.report("checkpoints");
}

/// Decodes every unit of a screen from `units` and merges them against `plan`, as `screen results`
/// does; `Err` is the refusal's message.
fn merge_units(
    plan: &cellfleet_shared::screen::ScreenPlan,
    plan_blake3: &str,
    units: &[(String, Vec<u8>)],
) -> Result<(), String> {
    use cellfleet_shared::screen::{Merger, UnitResult};
    let mut merger = Merger::new(plan, plan_blake3);
    for (key, bytes) in units {
        let result = UnitResult::decode(key, bytes).map_err(|e| e.to_string())?;
        merger.add(key, result).map_err(|e| e.to_string())?;
    }
    merger.finish(true).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn damaged_screen_unit_results_are_refused_by_the_merge() {
    use cellfleet_shared::screen::plan::unit_key;
    let dir = tempfile::tempdir().unwrap();
    let (corpus, ckpt) = checkpointed_run(dir.path());
    let out = dir.path().join("screen.out");
    let spec = dir.path().join("screen.toml");
    std::fs::write(
        &spec,
        format!(
            r#"checkpoint = {:?}
corpus = {:?}
out = {:?}
seed = 3
genes = "all"

[cells]
max_cells = 24

[goal]
column = "bulk_labels"
value = "CD14+ Monocyte"

[null]
genes = 4

[execution]
gene_block = 6
cell_block = 8
per_cell = true
anndata = true
"#,
            s(&ckpt),
            s(&corpus),
            s(&out)
        ),
    )
    .unwrap();
    cellfleet_ok(
        bin(),
        &[
            "screen",
            "run",
            spec.to_str().unwrap(),
            "--local",
            "--workers",
            "1",
        ],
    );
    let plan_bytes = std::fs::read(out.join("plan.json")).unwrap();
    let plan_blake3 = blake3::hash(&plan_bytes).to_hex().to_string();
    let plan: cellfleet_shared::screen::ScreenPlan = serde_json::from_slice(&plan_bytes).unwrap();
    let units: Vec<(String, Vec<u8>)> = (0..plan.unit_records.len())
        .map(|u| (unit_key(u), std::fs::read(out.join(unit_key(u))).unwrap()))
        .collect();
    assert!(units.len() >= 4, "{} units", units.len());
    merge_units(&plan, &plan_blake3, &units).expect("the undamaged screen merges");

    let mut tally = Tally::default();
    for i in 0..mutants(300) {
        let mut rng = Rng(0x554e_4954 ^ i as u64);
        let mut damaged = units.clone();
        let unit = rng.below(units.len());
        let (key, bytes) = &mut damaged[unit];
        let how = match i % 3 {
            // The stored bytes: zstd notices most of these.
            0 => mutate_bytes(&mut rng, bytes),
            // The payload inside a valid zstd frame: the decoder and the merge must notice.
            1 => {
                let mut raw = zstd::stream::decode_all(&bytes[..]).unwrap();
                let how = mutate_bytes(&mut rng, &mut raw);
                *bytes = zstd::bulk::compress(&raw, 3).unwrap();
                format!("payload: {how}")
            }
            // The JSON header inside the payload (magic, u32 length, header).
            _ => {
                let raw = zstd::stream::decode_all(&bytes[..]).unwrap();
                // The magic is one text line.
                let magic = raw.iter().position(|&b| b == b'\n').unwrap() + 1;
                let len = u32::from_le_bytes(raw[magic..magic + 4].try_into().unwrap()) as usize;
                let mut header: Value =
                    serde_json::from_slice(&raw[magic + 4..magic + 4 + len]).unwrap();
                let how = mutate_json(&mut rng, &mut header);
                let header = serde_json::to_vec(&header).unwrap();
                let mut rebuilt = raw[..magic].to_vec();
                rebuilt.extend_from_slice(&(header.len() as u32).to_le_bytes());
                rebuilt.extend_from_slice(&header);
                rebuilt.extend_from_slice(&raw[magic + 4 + len..]);
                *bytes = zstd::bulk::compress(&rebuilt, 3).unwrap();
                format!("header: {how}")
            }
        };
        let key = key.clone();
        let merged = std::panic::catch_unwind(|| merge_units(&plan, &plan_blake3, &damaged));
        let (outcome, message) = match merged {
            Ok(Ok(())) => (Outcome::Accepted, String::new()),
            Ok(Err(message)) if message.contains('\n') => {
                (Outcome::Unclear("more than one line".into()), message)
            }
            Ok(Err(message)) if !message.contains(&key) => {
                (Outcome::Unclear(format!("does not name {key}")), message)
            }
            Ok(Err(message)) => (Outcome::Refused, format!("error: {message}")),
            Err(panic) => {
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                (Outcome::Panicked(text.clone()), text)
            }
        };
        tally.add(&format!("{key} ({how})"), outcome, &message);
    }
    tally.report("screen unit results");
}
