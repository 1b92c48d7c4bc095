//! Cluster training with real processes: a coordinator (in-memory or on a real etcd), worker processes
//! that all-reduce through Gloo over loopback, and the real pbmc68k_reduced data.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use cellfleet_e2e::{
    cellfleet, cellfleet_ok, data, free_port, read_safetensors, wait_for, EtcdServer, Process,
};
use cellfleet_shared::meta::{conformance, EtcdStore};

const BIN: &str = env!("CARGO_BIN_EXE_cellfleet");

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// pbmc68k_reduced (700 real cells) over 128 genes: 630 training cells x 4 clones = an epoch of ~2.5k
/// samples, small enough that a tiny model runs more than one epoch in seconds.
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
    out.display().to_string()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn etcd_store_passes_the_metadata_store_suite() {
    let etcd = EtcdServer::start();
    let store = EtcdStore::connect(
        std::slice::from_ref(&etcd.endpoint),
        &format!("/test-{}/", std::process::id()),
        Duration::from_secs(5),
    )
    .await
    .expect("connects to the test etcd");
    // etcd leases are whole seconds (and at least a couple); 2 s keeps the lapse check short.
    conformance(&store, Duration::from_secs(2)).await;

    let nobody = format!("http://127.0.0.1:{}", free_port());
    let error = EtcdStore::connect(std::slice::from_ref(&nobody), "/x/", Duration::from_secs(1))
        .await
        .err()
        .expect("no etcd there");
    assert!(error.to_string().contains(&nobody), "{error}");
}

/// Per step (1-based), the (cell, clone) samples trained on.
type SamplesByStep = BTreeMap<u64, Vec<(u64, u32)>>;

/// Per step (1-based), the samples every rank of `generation` logged, merged.
fn samples_by_step(out: &Path, generation: u64) -> SamplesByStep {
    let mut steps = SamplesByStep::new();
    for entry in std::fs::read_dir(out.join("samples")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with(&format!("g{generation}-")) {
            continue;
        }
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
    steps
}

/// Per step, the samples of the newest generation that logged the step (a generation restored from a
/// checkpoint trains the steps after it again; its predecessor's later steps never committed), and per
/// generation the first and last step it contributed.
fn committed_by_step(out: &Path) -> (SamplesByStep, BTreeMap<u64, (u64, u64)>) {
    let mut committed = SamplesByStep::new();
    let mut from = BTreeMap::new();
    for generation in 1..=highest_generation(out) {
        for (step, samples) in samples_by_step(out, generation) {
            committed.insert(step, samples);
            from.insert(step, generation);
        }
    }
    let mut spans: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for (&step, &generation) in &from {
        let span = spans.entry(generation).or_insert((step, step));
        span.1 = step;
    }
    (committed, spans)
}

fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn highest_generation(out: &Path) -> u64 {
    std::fs::read_dir(out.join("samples"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().to_string();
            name.strip_prefix('g')?.split('-').next()?.parse().ok()
        })
        .max()
        .expect("some generation logged samples")
}

/// Checks the committed training (every step 1..=steps of the final generation): each step logged once
/// per rank, and every completed epoch consumed each training sample (cell, clone) exactly once.
fn assert_epochs_exactly_once(out: &Path, generation: u64, steps: u64, corpus: &str) {
    let by_step = samples_by_step(out, generation);
    assert_epochs_of_steps_exactly_once(
        &by_step,
        steps,
        corpus,
        &format!("generation {generation}"),
    );
}

/// The same audit over steps joined from several generations.
fn assert_epochs_of_steps_exactly_once(
    by_step: &SamplesByStep,
    steps: u64,
    corpus: &str,
    what: &str,
) {
    assert_eq!(
        by_step.keys().copied().collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>(),
        "{what} logged every step once"
    );
    // The training side of the split, computed here from the corpus and the split rule.
    let corpus = cellfleet_e2e::open_corpus(corpus);
    let split = cellfleet_shared::stream::CellSplit::default();
    let train_cells = (0..corpus.total_cells())
        .filter(|&c| split.part_of(c) == cellfleet_shared::stream::SplitPart::Train)
        .count();
    let epoch_len = train_cells * 4;
    let all: Vec<(u64, u32)> = by_step.values().flatten().copied().collect();
    let complete_epochs = all.len() / epoch_len;
    assert!(
        complete_epochs >= 1,
        "the run covers at least one epoch ({} samples, epoch {epoch_len})",
        all.len()
    );
    // Every complete epoch, and the last, partial one: no sample twice in it either.
    for (epoch, chunk) in all.chunks(epoch_len).enumerate() {
        let mut seen: HashMap<(u64, u32), usize> = HashMap::new();
        for sample in chunk {
            *seen.entry(*sample).or_default() += 1;
        }
        if chunk.len() == epoch_len {
            assert_eq!(
                seen.len(),
                epoch_len,
                "epoch {epoch}: every training sample appears"
            );
        }
        assert!(
            seen.values().all(|&n| n == 1),
            "epoch {epoch}: no sample twice"
        );
        assert!(
            seen.keys().all(|&(cell, clone)| clone < 4
                && split.part_of(cell) == cellfleet_shared::stream::SplitPart::Train),
            "epoch {epoch}: only training cells, clones 0..4"
        );
    }
}

fn coordinator(dir: &Path, port: u16, extra: &[&str], log: &str) -> Process {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["coordinator", "--listen", &listen];
    args.extend_from_slice(extra);
    let process = Process::spawn(bin(), &args, dir.join(log));
    wait_for("the coordinator to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(&listen).is_ok()
    });
    process
}

fn worker(dir: &Path, url: &str, name: &str) -> Process {
    Process::spawn(
        bin(),
        &["worker", "--coordinator", url, "--threads", "1"],
        dir.join(format!("{name}.log")),
    )
}

/// `cellfleet train --coordinator` in the background (it submits and follows the job).
fn submit(
    dir: &Path,
    url: &str,
    corpus: &str,
    out: &Path,
    steps: u64,
    workers: (u32, u32),
) -> Process {
    let (steps, min, max) = (
        steps.to_string(),
        workers.0.to_string(),
        workers.1.to_string(),
    );
    Process::spawn(
        bin(),
        &[
            "train",
            "--coordinator",
            url,
            "--corpus",
            corpus,
            "--out",
            &s(out),
            "--preset",
            "tiny",
            "--steps",
            &steps,
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--min-workers",
            &min,
            "--max-workers",
            &max,
            "--sample-log",
            "--collective-timeout",
            "5",
        ],
        dir.join("client.log"),
    )
}

#[test]
fn late_joiner_is_admitted_and_a_killed_worker_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = coordinator(dir.path(), port, &["--lease-ttl", "2"], "coordinator.log");
    let _first = worker(dir.path(), &url, "worker-a");
    let (out, ckpt) = (dir.path().join("model"), dir.path().join("ckpt"));
    // 200 steps, a checkpoint every 20: each new generation resumes from a checkpoint, not from step 0.
    let steps = 200;
    let mut client = submit_checkpointed(dir.path(), &url, &corpus, &out, &ckpt, &[]);

    // Generation 1: the first worker alone, past its first checkpoint. A second worker joins:
    // generation 2 with both, from that checkpoint, past a checkpoint of its own.
    wait_for("generation 1 to train", Duration::from_secs(60), || {
        lines_in(&out.join("samples/g1-r0.jsonl")) >= 25
    });
    let mut second = worker(dir.path(), &url, "worker-b");
    wait_for(
        "the joiner to train in generation 2",
        Duration::from_secs(60),
        || lines_in(&out.join("samples/g2-r1.jsonl")) >= 25,
    );
    // SIGKILL the joiner mid-step: the survivor must notice, and the job re-forms without it.
    let killed_at = std::time::Instant::now();
    second.kill();
    wait_for("generation 3 to train", Duration::from_secs(60), || {
        lines_in(&out.join("samples/g3-r0.jsonl")) >= 1
    });
    let recovered = killed_at.elapsed();
    let status = client.wait(Duration::from_secs(240));
    let text = client.log_text();
    assert!(status.success(), "the job finishes:\n{text}");
    assert!(text.contains("admitting"), "{text}");
    assert!(text.contains("lost"), "{text}");
    assert!(
        text.contains("1 workers in generation 3 (2 re-formations)"),
        "{text}"
    );
    eprintln!("worker killed -> next completed step: {recovered:.2?}");
    assert!(
        recovered < Duration::from_secs(15),
        "recovery took {recovered:?}"
    );
    assert!(out.join("model.safetensors").is_file());
    assert_eq!(highest_generation(&out), 3);
    // The committed history runs through all three generations, each later one from a checkpoint.
    let (committed, spans) = committed_by_step(&out);
    assert_eq!(spans.len(), 3, "{spans:?}");
    assert!(
        spans[&2].0 > 1 && spans[&3].0 > spans[&2].0 && (spans[&3].0 - 1) % 20 == 0,
        "generations 2 and 3 resumed from checkpoints: {spans:?}"
    );
    assert_epochs_of_steps_exactly_once(&committed, steps, &corpus, "generations 1-3");
}

/// Starts two workers and waits until both are registered, so a job submitted next gets both in
/// generation 1.
fn two_registered_workers(dir: &Path, url: &str) -> (Process, Process) {
    let workers = (worker(dir, url, "worker-a"), worker(dir, url, "worker-b"));
    wait_for("both workers to register", Duration::from_secs(30), || {
        let listed = cellfleet(bin(), &["job", "--coordinator", url, "workers"]);
        String::from_utf8_lossy(&listed.stdout)
            .matches(" yes ")
            .count()
            == 2
    });
    workers
}

/// `cellfleet train --coordinator` in the background: 200 tiny steps on 1-2 workers with sample logs,
/// checkpointing every 20 steps to `ckpt`, plus `extra` flags.
fn submit_checkpointed(
    dir: &Path,
    url: &str,
    corpus: &str,
    out: &Path,
    ckpt: &Path,
    extra: &[&str],
) -> Process {
    let (out, ckpt) = (s(out), s(ckpt));
    let mut args = vec![
        "train",
        "--coordinator",
        url,
        "--corpus",
        corpus,
        "--out",
        &out,
        "--preset",
        "tiny",
        "--steps",
        "200",
        "--batch-size",
        "32",
        "--threads",
        "1",
        "--min-workers",
        "1",
        "--max-workers",
        "2",
        "--sample-log",
        "--collective-timeout",
        "5",
        "--checkpoint",
        &ckpt,
        "--checkpoint-every",
        "20",
    ];
    args.extend_from_slice(extra);
    Process::spawn(bin(), &args, dir.join("client.log"))
}

/// The step a local checkpoint location's `latest` names (0 before the first commit).
fn latest_step(ckpt: &Path) -> u64 {
    std::fs::read_to_string(ckpt.join("latest"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// The step a worker's log says it restored.
fn restored_step(log: &str) -> u64 {
    log.lines()
        .find_map(|l| {
            let rest = l.split("restored checkpoint step ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("the worker restored a checkpoint:\n{log}"))
}

/// Generation 1's steps up to the checkpoint `restored` joined with generation `last`'s, and the first
/// step generation `last` logged.
fn joined_at_checkpoint(out: &Path, restored: u64, last: u64) -> (SamplesByStep, Option<u64>) {
    let mut joined: SamplesByStep = samples_by_step(out, 1)
        .into_iter()
        .filter(|(step, _)| *step <= restored)
        .collect();
    let resumed = samples_by_step(out, last);
    let first_resumed = resumed.keys().next().copied();
    joined.extend(resumed);
    (joined, first_resumed)
}

fn signal(process: &Process, signal: &str) {
    let pid = process.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap()
        .success());
}

#[test]
fn a_lost_worker_is_recovered_from_the_newest_checkpoint_recorded_in_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let corpus = small_corpus(dir.path());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let flags = ["--etcd", etcd.endpoint.as_str(), "--lease-ttl", "2"];
    let _coordinator = coordinator(dir.path(), port, &flags, "coordinator.log");
    let (first, mut second) = two_registered_workers(dir.path(), &url);
    let out = dir.path().join("model");
    let ckpt = dir.path().join("ckpt");
    let steps = 200u64;
    let mut client = submit_checkpointed(dir.path(), &url, &corpus, &out, &ckpt, &[]);
    wait_for(
        "checkpoint 40 to be committed",
        Duration::from_secs(120),
        || latest_step(&ckpt) >= 40,
    );
    second.kill();
    let status = client.wait(Duration::from_secs(240));
    let text = client.log_text();
    assert!(status.success(), "the job finishes:\n{text}");
    assert!(
        text.contains("1 workers in generation 2 (1 re-formations)"),
        "{text}"
    );
    // The survivor restored the newest committed checkpoint instead of starting over.
    let survivor = first.log_text();
    let restored = restored_step(&survivor);
    assert!(restored >= 40 && restored.is_multiple_of(20), "{survivor}");
    // Generation 1's steps up to the checkpoint and generation 2's after it are one run: every step
    // once, every completed epoch each sample once.
    let (joined, first_resumed) = joined_at_checkpoint(&out, restored, 2);
    assert_eq!(
        first_resumed,
        Some(restored + 1),
        "generation 2 starts after the checkpoint"
    );
    assert_epochs_of_steps_exactly_once(&joined, steps, &corpus, "generations 1 and 2");
    let listing = cellfleet_ok(bin(), &["ckpt", "ls", &s(&ckpt)]);
    assert!(
        listing
            .lines()
            .any(|l| l.trim_start().starts_with("200 ") && l.contains("<- latest")),
        "{listing}"
    );
}

#[test]
fn recovery_falls_back_past_a_corrupt_recorded_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = coordinator(dir.path(), port, &["--lease-ttl", "5"], "coordinator.log");
    let (first, mut second) = two_registered_workers(dir.path(), &url);
    let out = dir.path().join("model");
    let ckpt = dir.path().join("ckpt");
    let steps = 200u64;
    let mut client = submit_checkpointed(
        dir.path(),
        &url,
        &corpus,
        &out,
        &ckpt,
        &["--keep-last", "4"],
    );
    wait_for(
        "checkpoint 60 to be committed",
        Duration::from_secs(120),
        || latest_step(&ckpt) >= 60,
    );
    // Freeze both workers (shorter than the lease), corrupt every committed checkpoint from `latest` up
    // (the coordinator may have recorded one more than `latest` shows), then lose a worker.
    signal(&first, "-STOP");
    signal(&second, "-STOP");
    let newest = latest_step(&ckpt);
    let mut corrupted = Vec::new();
    for entry in std::fs::read_dir(&ckpt).unwrap() {
        let path = entry.unwrap().path();
        let Some(step) = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        else {
            continue;
        };
        let object = path.join("optimizer.safetensors.zst");
        if step >= newest
            && path
                .join(cellfleet_shared::checkpoint::MANIFEST_FILE)
                .exists()
            && object.exists()
        {
            let mut bytes = std::fs::read(&object).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x10;
            std::fs::write(&object, bytes).unwrap();
            corrupted.push(step);
        }
    }
    second.kill();
    signal(&first, "-CONT");
    assert!(!corrupted.is_empty());
    let status = client.wait(Duration::from_secs(240));
    let text = client.log_text();
    assert!(status.success(), "the job finishes:\n{text}");
    let survivor = first.log_text();
    assert!(
        survivor.contains("the checkpoint to restore is unusable"),
        "{survivor}"
    );
    let restored = restored_step(&survivor);
    let oldest_bad = *corrupted.iter().min().unwrap();
    assert!(
        restored < oldest_bad && restored >= 20,
        "restored {restored}, corrupted {corrupted:?}"
    );
    let (joined, _) = joined_at_checkpoint(&out, restored, highest_generation(&out));
    assert_epochs_of_steps_exactly_once(&joined, steps, &corpus, "generation 1 and the last");
}

#[test]
fn the_job_continues_across_a_coordinator_restart_with_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let corpus = small_corpus(dir.path());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let flags = ["--etcd", etcd.endpoint.as_str(), "--lease-ttl", "5"];
    let mut first = coordinator(dir.path(), port, &flags, "coordinator-1.log");
    let _workers = [
        worker(dir.path(), &url, "worker-a"),
        worker(dir.path(), &url, "worker-b"),
    ];
    let out = dir.path().join("model");
    let steps = 120;
    let mut client = submit(dir.path(), &url, &corpus, &out, steps, (2, 2));
    wait_for("training to start", Duration::from_secs(60), || {
        lines_in(&out.join("samples/g1-r1.jsonl")) >= 10
    });
    first.kill();
    let before = lines_in(&out.join("samples/g1-r0.jsonl"));
    let _second = coordinator(dir.path(), port, &flags, "coordinator-2.log");
    let status = client.wait(Duration::from_secs(240));
    let text = client.log_text();
    assert!(
        status.success(),
        "the job finishes after the restart:\n{text}"
    );
    // Same generation throughout: the restarted coordinator picked the job and both memberships up from
    // etcd, and the workers never stopped.
    assert!(
        text.contains("2 workers in generation 1 (0 re-formations)"),
        "{text}"
    );
    assert!(
        before < steps as usize,
        "the coordinator was killed mid-job"
    );
    assert_eq!(highest_generation(&out), 1);
    assert_epochs_exactly_once(&out, 1, steps, &corpus);
}

const DENSE: &str = "[ffn]\nkind = \"dense\"\nhidden = 64\n";
/// MoE without router noise: the noise is drawn per rank, so only the noiseless router can match exactly.
const MOE: &str =
    "[ffn]\nkind = \"moe\"\nexperts = 4\nhidden = 64\ntop_k = 2\nnoisy_gating = false\n";

/// Trains a tiny model (`ffn` table) for `steps` steps of global batch `batch` on `workers` local
/// workers; returns its parameters.
fn train_local(
    dir: &Path,
    corpus: &str,
    ffn: &str,
    (workers, steps, batch, lr): (u32, u64, u32, &str),
) -> BTreeMap<String, Vec<f32>> {
    let name = format!(
        "{}-w{workers}-s{steps}-b{batch}-lr{lr}",
        if ffn == DENSE { "dense" } else { "moe" }
    );
    let out = dir.join(&name);
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("preset = \"tiny\"\nwarmup_steps = 2\n{ffn}"),
    )
    .unwrap();
    let (workers, steps, batch) = (workers.to_string(), steps.to_string(), batch.to_string());
    let mut args = vec![
        "train",
        "--local",
        "--corpus",
        corpus,
        "--config",
        config.to_str().unwrap(),
        "--steps",
        &steps,
        "--batch-size",
        &batch,
        "--lr",
        lr,
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    if workers != "0" {
        args.extend(["--workers", workers.as_str()]);
    }
    cellfleet_ok(bin(), &args);
    read_safetensors(&out.join("model.safetensors"))
}

/// Largest |a - b| over all parameters (same names required).
fn max_difference(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(name, x)| x.iter().zip(&b[name]).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn two_workers_match_one_worker_with_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    for ffn in [DENSE, MOE] {
        // "workers 0": the plain single-process loop, trained with a vanishing lr (the initial weights).
        let init = train_local(dir.path(), &corpus, ffn, (0, 1, 16, "1e-12"));
        let one = train_local(dir.path(), &corpus, ffn, (1, 6, 16, "3e-3"));
        let two = train_local(dir.path(), &corpus, ffn, (2, 6, 16, "3e-3"));
        let (worst, moved) = (max_difference(&one, &two), max_difference(&one, &init));
        eprintln!("6 steps, global batch 16 ({}): max |1 worker - 2 workers| = {worst:e}; max movement from init = {moved:e}", ffn.lines().nth(1).unwrap());
        // Two halves summed by the all-reduce vs one batch: float rounding only (observed 1.2e-6 to
        // 3e-6, against parameters that moved by 1.1e-2).
        assert!(worst < 2e-5, "parameters differ by {worst}");
        assert!(moved > 1e-3, "training moved the parameters ({moved})");
    }

    // Across an epoch end whose last global batch is shorter than the world (a rank with nothing to
    // read), with MoE: 3 workers vs 1.
    let corpus_handle = cellfleet_e2e::open_corpus(&corpus);
    let split = cellfleet_shared::stream::CellSplit::default();
    let epoch_len = 4
        * (0..corpus_handle.total_cells())
            .filter(|&c| split.part_of(c) == cellfleet_shared::stream::SplitPart::Train)
            .count() as u64;
    let batch = (40..200u64)
        .find(|b| matches!(epoch_len % b, 1 | 2))
        .expect("a batch size whose epoch ends with 1 or 2 samples");
    let steps = epoch_len.div_ceil(batch) + 2;
    let init = train_local(dir.path(), &corpus, MOE, (0, 1, batch as u32, "1e-12"));
    let one = train_local(dir.path(), &corpus, MOE, (1, steps, batch as u32, "1e-3"));
    let three = train_local(dir.path(), &corpus, MOE, (3, steps, batch as u32, "1e-3"));
    let (worst, moved) = (max_difference(&one, &three), max_difference(&one, &init));
    eprintln!("{steps} steps of {batch} over an epoch of {epoch_len} (last batch {}), MoE: max |1 worker - 3 workers| = {worst:e}; max movement from init = {moved:e}", epoch_len % batch);
    // Observed 1.5e-6 to 2e-5 over these ~65 steps, against parameters that moved by 4e-2.
    assert!(worst < 5e-5, "parameters differ by {worst}");
    assert!(moved > 1e-2, "training moved the parameters ({moved})");
}

#[tokio::test]
async fn rejected_requests_get_clear_statuses() {
    use cellfleet_proto as pb;
    use cellfleet_proto::coordinator_client::CoordinatorClient;
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let port = free_port();
    let _coordinator = coordinator(dir.path(), port, &[], "coordinator.log");
    let mut client = CoordinatorClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();

    let status = client
        .job_status(pb::JobStatusRequest {
            job_id: "job-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(
        status.message().contains("unknown job \"job-nope\""),
        "{status:?}"
    );

    for (spec, expected) in [
        ("not json".to_string(), "job specification"),
        (
            serde_json::json!({"corpus": corpus, "out": "/tmp/x", "min_workers": 2, "max_workers": 1, "config": {}}).to_string(),
            "missing field `seed`",
        ),
        (
            serde_json::json!({"corpus": "/no/such/corpus", "out": "/tmp/x", "min_workers": 1, "max_workers": 1,
                "config": {"seed": 0, "steps": 5, "batch_size": 8, "augmentation": 4, "window_units": 16,
                           "split": {"seed": 0, "eval_fraction": 0.1}}}).to_string(),
            "/no/such/corpus",
        ),
    ] {
        let status = client
            .submit_job(pb::SubmitJobRequest { spec_json: spec })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(expected), "{status:?}");
    }

    // A worker that never registered, and a report for a job that does not exist.
    let status = client
        .heartbeat(pb::HeartbeatRequest {
            worker_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(status.message().contains("register again"), "{status:?}");
    let status = client
        .report_step(pb::StepReport {
            job_id: "job-nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    // A real job at generation 0 (no workers): reports and rendezvous for another generation are refused.
    let spec = serde_json::json!({"corpus": corpus, "out": s(&dir.path().join("m")), "min_workers": 1, "max_workers": 1,
        "config": {"seed": 0, "steps": 5, "batch_size": 8, "augmentation": 4, "window_units": 16,
                   "split": {"seed": 0, "eval_fraction": 0.1}}});
    let id = client
        .submit_job(pb::SubmitJobRequest {
            spec_json: spec.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let status = client
        .kv_get(pb::KvGetRequest {
            job_id: id.clone(),
            generation: 7,
            key: "k".into(),
            timeout_ms: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("generation 7 does not exist"),
        "{status:?}"
    );
    // A checkpoint commit from a generation that is not current is refused (the committer must not move
    // `latest`), as is one for an unknown job.
    for (job_id, generation, expected) in [
        (id.clone(), 3, "generation 3 does not exist"),
        ("job-nope".to_string(), 1, "unknown job"),
    ] {
        let answer = client
            .commit_checkpoint(pb::CheckpointCommit {
                worker_id: "w".into(),
                job_id,
                generation,
                step: 10,
                url: "/tmp/ckpt".into(),
                manifest_blake3: "00".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!answer.accepted);
        assert!(answer.reason.contains(expected), "{answer:?}");
    }
    // Resume and stop points are checked against the schedule.
    let mut bad = spec.clone();
    bad["resume"] = serde_json::json!({"url": "/tmp/ckpt", "step": 5});
    let status = client
        .submit_job(pb::SubmitJobRequest {
            spec_json: bad.to_string(),
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("`resume.step` 5"), "{status:?}");
    client
        .cancel_job(pb::CancelJobRequest { job_id: id.clone() })
        .await
        .unwrap();
    let status = client
        .cancel_job(pb::CancelJobRequest { job_id: id })
        .await
        .unwrap_err();
    assert!(status.message().contains("already cancelled"), "{status:?}");

    // The job command shows the refusal too, and lists the cancelled job's state.
    let url = format!("http://127.0.0.1:{port}");
    let out =
        cellfleet_e2e::cellfleet(bin(), &["job", "--coordinator", &url, "status", "job-nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown job \"job-nope\""));

    // The CLI says what was wrong with a job the coordinator refused.
    let out = cellfleet_e2e::cellfleet(
        bin(),
        &[
            "train",
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
            "--corpus",
            &corpus,
            "--batch-size",
            "1",
            "--max-workers",
            "2",
            "--out",
            &s(&dir.path().join("m2")),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refused the job") && stderr.contains("batch_size 1"),
        "{stderr}"
    );
}

#[test]
fn a_hung_worker_is_dropped_when_its_lease_lapses() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = coordinator(dir.path(), port, &["--lease-ttl", "2"], "coordinator.log");
    let _first = worker(dir.path(), &url, "worker-a");
    let mut second = worker(dir.path(), &url, "worker-b");
    let (out, ckpt) = (dir.path().join("model"), dir.path().join("ckpt"));
    let steps = 200;
    let mut client = submit_checkpointed(dir.path(), &url, &corpus, &out, &ckpt, &[]);
    // Both workers in one generation (1 if both registered before the job arrived, 2 otherwise), past a
    // checkpoint, so that the survivor's generation resumes from it.
    let mut both = 0;
    wait_for("both workers to train", Duration::from_secs(60), || {
        both = (1..=2)
            .find(|g| lines_in(&out.join(format!("samples/g{g}-r1.jsonl"))) >= 25)
            .unwrap_or(0);
        both > 0
    });
    // SIGSTOP: the process and its connections stay, but it neither heartbeats nor computes. Its lease
    // lapses (2 s), and the survivor gives up on the stuck all-reduce (5 s collective timeout).
    let hung_at = std::time::Instant::now();
    signal(&second, "-STOP");
    wait_for(
        "the survivor to train alone",
        Duration::from_secs(60),
        || lines_in(&out.join(format!("samples/g{}-r0.jsonl", both + 1))) >= 1,
    );
    eprintln!(
        "worker hung -> next completed step: {:.2?}",
        hung_at.elapsed()
    );
    let status = client.wait(Duration::from_secs(240));
    let text = client.log_text();
    second.kill();
    assert!(status.success(), "the job finishes:\n{text}");
    let summary = format!(
        "1 workers in generation {} ({both} re-formations)",
        both + 1
    );
    assert!(text.contains(&summary), "{text}");
    let (committed, spans) = committed_by_step(&out);
    let last = spans[&(both + 1)];
    assert!(
        last.0 > 1 && (last.0 - 1) % 20 == 0,
        "the survivor's generation resumed from a checkpoint: {spans:?}"
    );
    assert_epochs_of_steps_exactly_once(&committed, steps, &corpus, "every generation");
}
