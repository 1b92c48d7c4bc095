//! Checkpointed pretraining end to end with the real `cellfleet` binary on real cells: exact resume (also
//! on a real S3 server and with a different world size), corruption fallback, the S3 server dying during
//! an upload, and exported weights in PyTorch.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cellfleet_e2e::{cellfleet, cellfleet_ok, data, python, wait_for, GarageServer, Process};
use cellfleet_shared::stream::batch::{Loader, LoaderConfig, MaskConfig};
use cellfleet_shared::stream::{EpochPlan, OrderConfig};
use cellfleet_worker::model::Pooling;
use cellfleet_worker::train::batches::batch_tensors;
use cellfleet_worker::train::saved_model::SavedModel;
use tch::{Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_cellfleet");

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// pbmc68k_reduced (700 real cells) over 128 genes: an epoch of 2,544 training samples.
fn small_corpus(dir: &Path) -> String {
    let out = dir.join("corpus");
    cellfleet_ok(
        bin(),
        &[
            "ingest",
            data("pbmc68k_reduced.h5ad").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--hvg",
            "128",
        ],
    );
    s(&out)
}

/// `train --local` arguments of a tiny MoE run (one libtorch thread: bitwise reproducible on CPU).
fn train_args<'a>(corpus: &'a str, steps: &'a str, batch: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--corpus",
        corpus,
        "--local",
        "--preset",
        "tiny",
        "--steps",
        steps,
        "--batch-size",
        batch,
        "--threads",
        "1",
        "--out",
        out,
    ]
}

/// `train --local` arguments that resume run `checkpoint` from its newest checkpoint into `out` (its
/// settings come from the checkpoint).
fn resume_latest_args<'a>(corpus: &'a str, out: &'a str, checkpoint: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--corpus",
        corpus,
        "--local",
        "--threads",
        "1",
        "--out",
        out,
        "--checkpoint",
        checkpoint,
        "--resume",
        "latest",
    ]
}

fn run_ok(args: &[&str]) -> String {
    cellfleet_ok(bin(), args)
}

/// Per step, the samples every rank logged (sample logs of a run's generation 1).
fn samples_by_step(out: &Path) -> BTreeMap<u64, Vec<(u64, u32)>> {
    let mut steps: BTreeMap<u64, Vec<(u64, u32)>> = BTreeMap::new();
    for entry in std::fs::read_dir(out.join("samples")).unwrap() {
        let path = entry.unwrap().path();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let samples = v["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap() as u32));
            steps
                .entry(v["step"].as_u64().unwrap())
                .or_default()
                .extend(samples);
        }
    }
    for samples in steps.values_mut() {
        samples.sort_unstable();
    }
    steps
}

/// The expressed layout with length-bucketed batches resumes exactly too: the bucketed order is a pure
/// function of the cursor, and the log shows the padding it saves.
#[test]
fn in_the_expressed_layout_with_bucketing_a_resumed_run_is_bitwise_identical() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let config = dir.path().join("expressed.toml");
    std::fs::write(
        &config,
        "bucket_batches = 4\n[layout]\nkind = \"expressed\"\nunexpressed = 8\n",
    )
    .unwrap();
    let config = s(&config);
    let (full, part) = (s(&dir.path().join("full")), s(&dir.path().join("part")));
    let checkpoint = s(&dir.path().join("ckpt"));
    let mut straight = train_args(&corpus, "16", "16", &full);
    straight.extend(["--config", &config]);
    let log = run_ok(&straight);
    assert!(log.contains("expressed layout"), "{log}");
    let mut first = train_args(&corpus, "16", "16", &part);
    first.extend([
        "--config",
        &config,
        "--checkpoint",
        &checkpoint,
        "--checkpoint-every",
        "4",
        "--stop-after",
        "7",
    ]);
    run_ok(&first);
    run_ok(&resume_latest_args(&corpus, &part, &checkpoint));
    let a = std::fs::read(dir.path().join("full/model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("part/model.safetensors")).unwrap();
    assert!(a == b, "the resumed expressed-layout run's weights differ");
    // Rows are shorter than the vocabulary and the batches carry little padding.
    let steps: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.path().join("full/pretrain_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let tokens: u64 = steps.iter().map(|r| r["tokens"].as_u64().unwrap()).sum();
    let padding: u64 = steps
        .iter()
        .map(|r| r["padding"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        tokens < 16 * 16 * 129,
        "{tokens} tokens in 16 steps of 16 cells: not the expressed layout"
    );
    assert!(
        (padding as f64) < 0.15 * (tokens + padding) as f64,
        "{padding} padding slots next to {tokens} tokens"
    );
}

#[test]
fn a_resumed_run_is_bitwise_identical_to_an_uninterrupted_one_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let garage = GarageServer::start(bin());
    let (full, part) = (s(&dir.path().join("full")), s(&dir.path().join("part")));
    let run_url = garage.url("runs/resume");
    let ok = |args: &[&str]| {
        let output = garage.cellfleet(args);
        assert!(
            output.status.success(),
            "cellfleet {args:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).to_string()
    };

    // 2N steps uninterrupted (no checkpoints) ...
    run_ok(&train_args(&corpus, "24", "16", &full));
    // ... versus N steps, stop (checkpoint in Garage), resume from `latest` for the other N.
    let mut first = train_args(&corpus, "24", "16", &part);
    first.extend([
        "--checkpoint",
        &run_url,
        "--checkpoint-every",
        "5",
        "--stop-after",
        "12",
    ]);
    ok(&first);
    let listing =
        String::from_utf8_lossy(&garage.cellfleet(&["ckpt", "ls", &run_url]).stdout).to_string();
    assert!(
        listing.contains("12") && listing.contains("<- latest"),
        "{listing}"
    );
    let resumed_log = ok(&resume_latest_args(&corpus, &part, &run_url));
    assert!(
        resumed_log.contains("resuming from checkpoint step 12"),
        "{resumed_log}"
    );
    let a = std::fs::read(dir.path().join("full/model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("part/model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed run's weights differ from the uninterrupted run's"
    );

    // Settings that would change the trajectory are refused, naming them.
    let refused = garage.cellfleet(&[
        "train",
        "--corpus",
        &corpus,
        "--local",
        "--out",
        &part,
        "--checkpoint",
        &run_url,
        "--resume",
        "10",
        "--lr",
        "0.5",
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("lr: 0.001 -> 0.5"), "{err}");
}

#[test]
fn resuming_on_one_worker_after_two_continues_the_sample_order() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let ckpt = s(&dir.path().join("ckpt"));
    let (two, one, reference) = (
        s(&dir.path().join("two")),
        s(&dir.path().join("one")),
        s(&dir.path().join("reference")),
    );
    // Batch 64: the first epoch (2,544 samples) ends inside step 40 of 50; the switch is at step 25.
    let mut first = train_args(&corpus, "50", "64", &two);
    first.extend([
        "--workers",
        "2",
        "--sample-log",
        "--checkpoint",
        &ckpt,
        "--checkpoint-every",
        "10",
        "--stop-after",
        "25",
    ]);
    run_ok(&first);
    let out = run_ok(&[
        "train",
        "--corpus",
        &corpus,
        "--local",
        "--threads",
        "1",
        "--workers",
        "1",
        "--sample-log",
        "--out",
        &one,
        "--checkpoint",
        &ckpt,
        "--resume",
        "latest",
    ]);
    assert!(out.contains("50 of 50 steps"), "{out}");
    let mut uninterrupted = train_args(&corpus, "50", "64", &reference);
    uninterrupted.extend(["--workers", "1", "--sample-log"]);
    run_ok(&uninterrupted);

    let before = samples_by_step(Path::new(&two));
    let after = samples_by_step(Path::new(&one));
    assert_eq!(
        before.keys().copied().collect::<Vec<_>>(),
        (1..=25).collect::<Vec<_>>()
    );
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        (26..=50).collect::<Vec<_>>()
    );
    let mut joined = before;
    joined.extend(after);
    assert_eq!(
        joined,
        samples_by_step(Path::new(&reference)),
        "2 workers then 1 read the same global batches as 1 worker throughout"
    );
    // Each training sample exactly once in the completed first epoch.
    let first_epoch: Vec<(u64, u32)> = joined.values().flatten().copied().take(2544).collect();
    let distinct: HashSet<_> = first_epoch.iter().collect();
    assert_eq!(distinct.len(), 2544, "no sample repeats within the epoch");
    assert!(first_epoch.iter().all(|&(_, clone)| clone < 4));
}

#[test]
fn a_corrupt_newest_checkpoint_is_named_and_resume_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let ckpt = dir.path().join("ckpt");
    let out = s(&dir.path().join("out"));
    let mut args = train_args(&corpus, "30", "16", &out);
    args.extend([
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--checkpoint-every",
        "10",
    ]);
    args.extend(["--stop-after", "20"]);
    run_ok(&args);
    // One flipped byte in the newest checkpoint's optimizer state.
    let object = ckpt.join("step-000000000020/optimizer.safetensors.zst");
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&object, bytes).unwrap();

    let verify = cellfleet(bin(), &["ckpt", "verify", ckpt.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        !verify.status.success(),
        "verify fails on a corrupt checkpoint"
    );
    assert!(report.contains("step-000000000010: ok"), "{report}");
    assert!(
        report.contains("step-000000000020: optimizer.safetensors: content hash"),
        "{report}"
    );
    let resumed = cellfleet(
        bin(),
        &[
            "train",
            "--corpus",
            &corpus,
            "--local",
            "--threads",
            "1",
            "--out",
            &out,
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--resume",
            "latest",
        ],
    );
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{log}");
    assert!(
        log.contains("skipping checkpoint step-000000000020: optimizer.safetensors"),
        "{log}"
    );
    assert!(log.contains("resuming from checkpoint step 10"), "{log}");
    // Naming the broken step is an error that says why.
    let named = cellfleet(
        bin(),
        &[
            "train",
            "--corpus",
            &corpus,
            "--local",
            "--out",
            &out,
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--resume",
            "20",
        ],
    );
    let err = String::from_utf8_lossy(&named.stderr);
    assert!(!named.status.success());
    assert!(
        err.contains("optimizer.safetensors") && err.contains("content hash"),
        "{err}"
    );
}

#[test]
fn exported_weights_give_the_same_cell_embeddings_in_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_url = small_corpus(dir.path());
    let ckpt = s(&dir.path().join("ckpt"));
    let out = s(&dir.path().join("out"));
    let mut args = train_args(&corpus_url, "15", "16", &out);
    args.extend(["--checkpoint", &ckpt]);
    run_ok(&args);
    let export_dir = dir.path().join("export");
    let exported = export_dir.join("model.safetensors");
    let said = run_ok(&["ckpt", "export", &ckpt, "--out", &s(&exported)]);
    assert!(said.contains("exported step 15"), "{said}");
    // The export holds the trained weights: the same tensors as the run's own model file.
    assert_eq!(
        cellfleet_e2e::read_safetensors(&exported),
        cellfleet_e2e::read_safetensors(&dir.path().join("out/model.safetensors"))
    );

    // Six real cells, tokenized by the corpus loader (no masking, no augmentation).
    let corpus = Arc::new(cellfleet_e2e::open_corpus(&corpus_url));
    let order = OrderConfig {
        seed: 0,
        augmentation: 1,
        window_units: 16,
    };
    let plan = Arc::new(EpochPlan::new(&corpus.manifest, order, 0).unwrap());
    let config = LoaderConfig {
        mask: MaskConfig::masking_only(0.0),
        ..LoaderConfig::default()
    };
    let first_six = std::iter::once(0..6).collect();
    let batch = Loader::spawn(corpus, plan, first_six, config)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let (tokens, _) = batch_tensors(&batch, Device::Cpu);
    let rows = |t: &Tensor| -> Vec<Vec<i64>> {
        (0..6)
            .map(|i| Vec::<i64>::try_from(t.get(i)).unwrap())
            .collect()
    };
    let tokens_file = dir.path().join("tokens.json");
    std::fs::write(
        &tokens_file,
        serde_json::json!({"genes": rows(&tokens.gene_ids), "bins": rows(&tokens.bins)})
            .to_string(),
    )
    .unwrap();
    let torch_side: serde_json::Value = serde_json::from_str(&python(
        "torch_forward.py",
        &[&s(&export_dir), &s(&tokens_file)],
    ))
    .unwrap();

    let saved = SavedModel::open(&export_dir).unwrap();
    let model = saved.load(saved.info.config.clone(), Device::Cpu).unwrap();
    let ours = Vec::<f32>::try_from(model.embed(&tokens, Pooling::Cls).flatten(0, -1)).unwrap();
    let theirs: Vec<f64> = torch_side["cls"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours.len(), 6 * saved.info.config.d_model);
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    println!("max |cellfleet - PyTorch| over 6 cells' [CLS] embeddings: {worst:.2e}");
    assert!(worst < 1e-4, "embeddings differ by {worst}");
}

/// Waits for `needle` in a process's log; panics with the log when the process ends first.
fn wait_log(process: &mut Process, needle: &str, limit: Duration) {
    wait_for(needle, limit, || process.log_text().contains(needle));
}

#[test]
fn the_s3_server_dying_during_an_upload_fails_one_save_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let mut garage = GarageServer::start(bin());
    let run_url = garage.url("runs/outage");
    let out = s(&dir.path().join("out"));
    // Saves every 100 steps capped at 0.3 MB/s (a 2.3 MB checkpoint takes ~8 s to upload, so the kill
    // lands mid-upload with room to spare), requests give up after 3 s; 300 steps leave ~100 steps
    // between the failed save and the final one (which also retries an unreachable store).
    let mut args = train_args(&corpus, "300", "64", &out);
    args.extend([
        "--checkpoint",
        &run_url,
        "--checkpoint-every",
        "100",
        "--upload-limit",
        "0.3",
        "--store-retry",
        "3",
    ]);
    let mut training =
        Process::spawn_with_env(bin(), &args, &garage.env(), dir.path().join("train.log"));
    wait_log(
        &mut training,
        "checkpoint step 100 saved",
        Duration::from_secs(120),
    );
    // Kill the server once the step-200 save has stored its first object (the others still uploading).
    let ls = |garage: &GarageServer| {
        String::from_utf8_lossy(&garage.cellfleet(&["ckpt", "ls", &run_url]).stdout).to_string()
    };
    wait_for(
        "the step-200 save to start storing",
        Duration::from_secs(120),
        || ls(&garage).contains("incomplete"),
    );
    garage.kill();
    wait_log(
        &mut training,
        "checkpoint step 200 failed",
        Duration::from_secs(60),
    );
    garage.restart();
    let listing = ls(&garage);
    let row = |step: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(step))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        row("200").contains("incomplete"),
        "no manifest for step 200:\n{listing}"
    );
    assert!(
        row("100").contains("<- latest"),
        "latest still at 100:\n{listing}"
    );
    let status = training.wait(Duration::from_secs(300));
    let log = training.log_text();
    assert!(status.success(), "{log}");
    assert!(log.contains("checkpoint step 300 saved"), "{log}");
    let listing = ls(&garage);
    assert!(
        listing
            .lines()
            .any(|l| l.split_whitespace().next() == Some("300") && l.contains("<- latest")),
        "{listing}"
    );
    let verify = garage.cellfleet(&["ckpt", "verify", &run_url]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
