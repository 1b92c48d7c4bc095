//! In-silico knockout screens end to end with the real `cellfleet` binary on the real Kang IFN-beta
//! cells: bad specifications refused before any work, 1 and 2 workers agreeing exactly, a worker
//! SIGKILLed and the coordinator restarted (etcd) mid-screen without losing or repeating a (gene, cell)
//! pair, and a biology check against the genes differentially expressed between the conditions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellfleet_e2e::{
    cellfleet, cellfleet_ok, data, open_corpus, python, wait_for, EtcdServer, Process,
};
use cellfleet_shared::screen::stats::auroc;
use cellfleet_shared::screen::ScreenPlan;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cellfleet");

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A model pretrained on Kang (the 256 most expressed genes, labels `condition` and `cell_type`) with its
/// checkpoints.
struct Trained {
    corpus: String,
    checkpoint: String,
}

/// Pretrains once per build of the binary and shares the result between this file's tests (each runs in
/// its own process under nextest: the first takes a lock and trains, the others wait for it).
fn trained_kang() -> Trained {
    let binary = std::fs::read(bin()).unwrap();
    let key = &blake3::hash(&binary).to_hex()[..16];
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).unwrap();
    let dir = root.join(format!("kang-screen-{key}"));
    let lock = std::fs::File::create(root.join(format!("kang-screen-{key}.lock"))).unwrap();
    // SAFETY: flock on a file descriptor this function owns; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let trained = Trained {
        corpus: s(&dir.join("corpus")),
        checkpoint: s(&dir.join("ckpt")),
    };
    if !dir.join("ready").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // The vocabulary: the 256 most expressed genes, chosen without looking at the conditions. (The
        // 256 most variable genes by normalized dispersion miss nearly every interferon-response gene.)
        let genes = dir.join("genes.txt");
        let listed = std::process::Command::new(
            std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()),
        )
        .arg(cellfleet_e2e::workspace_root().join("scripts/top_expressed.py"))
        .args([data("kang_ifnb_pbmc.h5ad").to_str().unwrap(), "256"])
        .output()
        .expect("python3 runs (scripts/setup.sh installs it with anndata)");
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        std::fs::write(&genes, &listed.stdout).unwrap();
        cellfleet_ok(
            bin(),
            &[
                "ingest",
                data("kang_ifnb_pbmc.h5ad").to_str().unwrap(),
                "--out",
                &trained.corpus,
                "--genes",
                &s(&genes),
                "--label-col",
                "condition",
                "--label-col",
                "cell_type",
            ],
        );
        cellfleet_ok(
            bin(),
            &[
                "train",
                "--corpus",
                &trained.corpus,
                "--local",
                "--preset",
                "tiny",
                "--steps",
                "300",
                "--batch-size",
                "32",
                "--lr",
                "3e-3",
                "--threads",
                "1",
                "--out",
                &s(&dir.join("model")),
                "--checkpoint",
                &trained.checkpoint,
            ],
        );
        std::fs::write(dir.join("ready"), "").unwrap();
    }
    trained
}

/// Writes a screen specification for the trained model; `extra` is appended (TOML).
fn write_spec(dir: &Path, name: &str, trained: &Trained, body: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "checkpoint = {:?}\ncorpus = {:?}\nout = {:?}\nseed = 3\n{body}",
        trained.checkpoint,
        trained.corpus,
        s(&dir.join(format!("{name}.out")))
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A knockout screen of every vocabulary gene in up to `cells` stimulated cells, toward control.
fn stimulated_toward_control(cells: u32, gene_block: u32, cell_block: u32) -> String {
    format!(
        r#"genes = "all"

[cells]
filter = {{ condition = "stimulated" }}
max_cells = {cells}

[goal]
column = "condition"
value = "control"
alternatives = ["stimulated"]
match_column = "cell_type"
max_cells = 200

[null]
genes = 20

[execution]
gene_block = {gene_block}
cell_block = {cell_block}
batch = 32
lease_seconds = 20
per_cell = true
"#
    )
}

/// `cellfleet screen run SPEC --local --workers N --out OUT`; returns stdout (the top hits).
fn screen_run(spec: &Path, workers: &str, out: &Path) -> String {
    cellfleet_ok(
        bin(),
        &[
            "screen",
            "run",
            &s(spec),
            "--local",
            "--workers",
            workers,
            "--out",
            &s(out),
        ],
    )
}

/// The tables of a results directory as pandas reads them.
fn read_results(dir: &Path) -> Value {
    serde_json::from_str(&python("read_screen.py", &[&s(dir)])).unwrap()
}

fn rows<'a>(results: &'a Value, table: &str) -> &'a Vec<Value> {
    results[table]["rows"].as_array().unwrap()
}

fn plan_of(spec_out: &Path) -> ScreenPlan {
    serde_json::from_slice(&std::fs::read(spec_out.join("plan.json")).unwrap()).unwrap()
}

/// (gene, cell) pairs a knockout screen must cover, counted from the corpus itself: every work gene
/// expressed (bin > 0) in every selected cell.
fn expected_pairs(plan: &ScreenPlan, corpus: &str) -> HashSet<(u32, u64)> {
    let corpus = open_corpus(corpus);
    let mut bins: HashMap<u64, Vec<u8>> = HashMap::new();
    for i in 0..corpus.manifest.shards.len() {
        let shard = corpus.fetch_shard(i).unwrap();
        for b in 0..shard.n_blocks() {
            let block = shard.read_block(b).unwrap();
            for c in 0..block.cells {
                bins.insert(bins.len() as u64, block.bins_of(c).to_vec());
            }
        }
    }
    let mut pairs = HashSet::new();
    for &cell in &plan.cells {
        for &gene in &plan.work_genes {
            if bins[&cell][gene as usize] > 0 {
                pairs.insert((gene, cell));
            }
        }
    }
    pairs
}

/// Checks the per-cell table holds every expected pair exactly once.
fn assert_exactly_once(results: &Value, expected: &HashSet<(u32, u64)>) {
    let mut seen = HashSet::new();
    for row in rows(results, "cells") {
        let pair = (
            row["gene_id"].as_u64().unwrap() as u32,
            row["cell"].as_u64().unwrap(),
        );
        assert!(seen.insert(pair), "pair {pair:?} appears twice");
    }
    assert_eq!(seen.len(), expected.len(), "pairs in the per-cell table");
    assert!(
        seen == *expected,
        "the per-cell table covers other pairs than expected"
    );
}

#[test]
fn bad_specs_are_refused_before_any_work_starts() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("pbmc");
    cellfleet_ok(
        bin(),
        &[
            "ingest",
            data("pbmc68k_reduced.h5ad").to_str().unwrap(),
            "--out",
            &s(&other),
            "--hvg",
            "128",
        ],
    );
    let base = stimulated_toward_control(20, 32, 32);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown-column",
            base.replace("condition = \"stimulated\"", "donor = \"A\""),
            vec![
                "cells.filter.donor",
                "no obs column \"donor\"",
                "condition, cell_type",
                "--label-col donor",
            ],
        ),
        (
            "absent-value",
            base.replace("\"stimulated\" }", "\"sleeping\" }"),
            vec![
                "no cell has condition = \"sleeping\"",
                "values in the corpus: ",
                "control",
            ],
        ),
        (
            "absent-goal",
            base.replace("value = \"control\"", "value = \"ctrl\""),
            vec!["goal.value", "no cell has condition = \"ctrl\""],
        ),
        (
            "empty-genes",
            base.replace("genes = \"all\"", "genes = []"),
            vec!["gene list is empty"],
        ),
        (
            "unknown-gene",
            base.replace("genes = \"all\"", "genes = [\"CXCL10\", \"NOT-A-GENE\"]"),
            vec!["genes: gene \"NOT-A-GENE\" is not in the checkpoint's vocabulary of 256 genes"],
        ),
        (
            "typo",
            format!("colour = 1\n{base}"),
            vec!["unknown field `colour`"],
        ),
    ];
    let mut specs: Vec<(PathBuf, Vec<&str>)> = cases
        .into_iter()
        .map(|(name, body, expect)| (write_spec(dir.path(), name, &trained, &body), expect))
        .collect();
    // A corpus with another vocabulary, and a checkpoint location that does not exist.
    let mismatch = write_spec(dir.path(), "mismatch", &trained, &base);
    let text = std::fs::read_to_string(&mismatch).unwrap().replace(
        &format!("corpus = {:?}", trained.corpus),
        &format!("corpus = {:?}", s(&other)),
    );
    std::fs::write(&mismatch, text).unwrap();
    specs.push((
        mismatch,
        vec![
            "does not use the checkpoint's gene vocabulary",
            "--genes",
            "manifest.json",
        ],
    ));
    let missing = write_spec(dir.path(), "missing", &trained, &base);
    let gone = s(&dir.path().join("no-such-run"));
    let text = std::fs::read_to_string(&missing).unwrap().replace(
        &format!("checkpoint = {:?}", trained.checkpoint),
        &format!("checkpoint = {gone:?}"),
    );
    std::fs::write(&missing, text).unwrap();
    specs.push((
        missing,
        vec!["checkpoint = ", "no checkpoints at", "does not exist"],
    ));

    for (spec, expect) in specs {
        let out = cellfleet(
            bin(),
            &["screen", "run", &s(&spec), "--local", "--workers", "1"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", spec.display());
        for needle in expect {
            assert!(
                stderr.contains(needle),
                "{}: expected {needle:?} in the error, got:\n{stderr}",
                spec.display()
            );
        }
        // Refused before any work: no plan stored, no worker started.
        let spec_out = PathBuf::from(format!("{}.out", spec.display()));
        assert!(
            !spec_out.join("plan.json").exists(),
            "{}: a plan was stored",
            spec.display()
        );
        assert!(
            !spec_out.join("results").join("workers").exists(),
            "{}: workers started",
            spec.display()
        );
    }
}

#[test]
fn one_and_two_workers_give_identical_results() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let body = stimulated_toward_control(48, 64, 16);
    let mut results = Vec::new();
    for workers in ["1", "2"] {
        let spec = write_spec(dir.path(), &format!("w{workers}"), &trained, &body);
        let out = dir.path().join(format!("results-{workers}"));
        let stdout = screen_run(&spec, workers, &out);
        assert!(stdout.contains("top 15 of 256 genes"), "{stdout}");
        let record: Value =
            serde_json::from_slice(&std::fs::read(out.join("screen.json")).unwrap()).unwrap();
        assert!(
            record["checkpoint"]["step"].as_u64() == Some(300),
            "{record}"
        );
        assert!(
            record["checkpoint"]["manifest_blake3"]
                .as_str()
                .unwrap()
                .len()
                == 64
        );
        assert_eq!(record["spec"]["goal"]["value"], "control");
        let plan = plan_of(&PathBuf::from(format!("{}.out", spec.display())));
        assert!(plan.unit_count() >= 12, "{} units", plan.unit_count());
        let tables = read_results(&out);
        assert_exactly_once(&tables, &expected_pairs(&plan, &trained.corpus));
        results.push(tables);
    }
    let columns = results[0]["genes"]["columns"].clone();
    for expected in [
        "rank",
        "gene",
        "n_cells",
        "cosine_shift",
        "goal_shift",
        "shift_to_stimulated",
        "p_value",
        "fdr",
        "null_gene",
        "top_affected",
        "top_affected_delta_bin",
    ] {
        assert!(
            columns.as_array().unwrap().iter().any(|c| c == expected),
            "{expected} missing from {columns}"
        );
    }
    assert_eq!(rows(&results[0], "genes").len(), 256);
    assert_eq!(
        results[0]["genes"], results[1]["genes"],
        "per-gene results differ between 1 and 2 workers"
    );
    assert_eq!(
        results[0]["cells"], results[1]["cells"],
        "per-cell results differ between 1 and 2 workers"
    );
}

fn status_json(url: &str, id: &str) -> Value {
    serde_json::from_str(&cellfleet_ok(
        bin(),
        &["screen", "status", id, "--coordinator", url, "--json"],
    ))
    .unwrap()
}

fn start_coordinator(dir: &Path, port: u16, etcd: &str, name: &str) -> Process {
    let listen = format!("127.0.0.1:{port}");
    let coordinator = Process::spawn(
        bin(),
        &["coordinator", "--listen", &listen, "--etcd", etcd],
        dir.join(format!("{name}.log")),
    );
    wait_for("the coordinator to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(&listen).is_ok()
    });
    coordinator
}

#[test]
fn killed_worker_and_restarted_coordinator_lose_and_repeat_nothing() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let port = cellfleet_e2e::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut coordinator = start_coordinator(dir.path(), port, &etcd.endpoint, "coordinator-1");
    let mut workers: Vec<Process> = (0..2)
        .map(|i| {
            Process::spawn(
                bin(),
                &["worker", "--coordinator", &url, "--threads", "1"],
                dir.path().join(format!("worker-{i}.log")),
            )
        })
        .collect();
    let body = stimulated_toward_control(96, 32, 16);
    let spec = write_spec(dir.path(), "screen", &trained, &body);
    let id = cellfleet_ok(
        bin(),
        &["screen", "submit", &s(&spec), "--coordinator", &url],
    )
    .trim()
    .to_string();
    assert!(id.starts_with("screen-"), "{id}");

    // SIGKILL a worker that holds a lease once some units are done.
    let mut victim = None;
    wait_for(
        "a few units done and a lease held",
        Duration::from_secs(240),
        || {
            let status = status_json(&url, &id);
            let done = status["units_done"].as_u64().unwrap();
            let holders = status["workers"].as_array().unwrap();
            if done >= 3 && done + 4 < status["units_total"].as_u64().unwrap() {
                victim = holders.iter().find_map(|holder| {
                    workers.iter().position(|w| {
                        holder
                            .as_str()
                            .unwrap()
                            .contains(&format!("-{}-", w.child.id()))
                    })
                });
            }
            victim.is_some()
        },
    );
    let victim = victim.unwrap();
    workers[victim].kill();

    // Restart the coordinator (SIGKILL, same etcd) while units remain.
    wait_for(
        "a unit completed after the kill",
        Duration::from_secs(120),
        || status_json(&url, &id)["releases"].as_u64().unwrap() >= 1,
    );
    let before = status_json(&url, &id);
    assert!(before["state"] == "running", "{before}");
    coordinator.kill();
    std::thread::sleep(Duration::from_millis(500));
    coordinator = start_coordinator(dir.path(), port, &etcd.endpoint, "coordinator-2");
    let after = status_json(&url, &id);
    assert!(
        after["units_done"].as_u64() >= before["units_done"].as_u64(),
        "the restarted coordinator forgot completed units: {before} -> {after}"
    );
    wait_for("the screen to complete", Duration::from_secs(300), || {
        let status = status_json(&url, &id);
        assert!(
            status["state"] != "failed" && status["state"] != "cancelled",
            "{status}"
        );
        status["state"] == "completed"
    });
    let final_status = status_json(&url, &id);
    assert!(
        final_status["releases"].as_u64().unwrap() >= 1,
        "{final_status}"
    );

    let out = dir.path().join("results");
    cellfleet_ok(
        bin(),
        &[
            "screen",
            "results",
            &id,
            "--coordinator",
            &url,
            "--out",
            &s(&out),
            "--per-cell",
        ],
    );
    let disturbed = read_results(&out);
    let plan = plan_of(&dir.path().join("screen.out"));
    assert_exactly_once(&disturbed, &expected_pairs(&plan, &trained.corpus));

    // The same screen, undisturbed, on the embedded default.
    let quiet_spec = write_spec(dir.path(), "undisturbed", &trained, &body);
    let quiet_out = dir.path().join("undisturbed-results");
    screen_run(&quiet_spec, "1", &quiet_out);
    let undisturbed = read_results(&quiet_out);
    assert_eq!(
        disturbed["genes"], undisturbed["genes"],
        "a disturbed screen differs from an undisturbed one"
    );
    assert_eq!(disturbed["cells"], undisturbed["cells"]);

    // Cancelling a finished screen is refused with its state.
    let refused = cellfleet(bin(), &["screen", "cancel", &id, "--coordinator", &url]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("completed"));

    // A running screen is cancelled: no unit is leased afterwards and its results are refused.
    let second = write_spec(dir.path(), "second", &trained, &body);
    let second_id = cellfleet_ok(
        bin(),
        &["screen", "submit", &s(&second), "--coordinator", &url],
    )
    .trim()
    .to_string();
    wait_for(
        "the second screen to start",
        Duration::from_secs(120),
        || {
            status_json(&url, &second_id)["units_done"]
                .as_u64()
                .unwrap()
                >= 1
        },
    );
    cellfleet_ok(
        bin(),
        &["screen", "cancel", &second_id, "--coordinator", &url],
    );
    let cancelled = status_json(&url, &second_id);
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert!(cancelled["units_done"].as_u64() < cancelled["units_total"].as_u64());
    wait_for(
        "workers to drop the cancelled screen",
        Duration::from_secs(30),
        || status_json(&url, &second_id)["units_leased"].as_u64() == Some(0),
    );
    let partial = cellfleet(
        bin(),
        &[
            "screen",
            "results",
            &second_id,
            "--coordinator",
            &url,
            "--out",
            &s(&dir.path().join("partial")),
        ],
    );
    assert!(!partial.status.success());
    assert!(String::from_utf8_lossy(&partial.stderr).contains("is cancelled"));
    drop(workers);
    drop(coordinator);
}

#[test]
fn knockouts_that_move_stimulated_cells_toward_control_are_interferon_response_genes() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let body =
        stimulated_toward_control(200, 64, 50).replace("per_cell = true", "per_cell = false");
    let spec = write_spec(dir.path(), "ifnb", &trained, &body);
    let out = dir.path().join("results");
    screen_run(&spec, "2", &out);
    let results = read_results(&out);
    let genes = rows(&results, "genes");
    assert_eq!(genes.len(), 256);

    // Independently of the screen: the 50 genes most up in stimulated cells (Welch t on the h5ad's
    // log-normalized values), among the vocabulary.
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(Path::new(&trained.corpus).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let vocabulary = dir.path().join("vocabulary.txt");
    let names: Vec<&str> = manifest["genes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    std::fs::write(&vocabulary, names.join("\n")).unwrap();
    let up: Vec<String> = serde_json::from_str(&python(
        "kang_de.py",
        &[
            data("kang_ifnb_pbmc.h5ad").to_str().unwrap(),
            "condition",
            "stimulated",
            "control",
            "50",
            "--genes",
            &s(&vocabulary),
        ],
    ))
    .unwrap();
    assert_eq!(up.len(), 50);
    let up: HashSet<&str> = up.iter().map(String::as_str).collect();

    // The screen's two goal measures: its ranking (goal progress, the `rank` column) and the cosine goal
    // shift; genes expressed in no screened cell rank last.
    let positive: Vec<bool> = genes
        .iter()
        .map(|g| up.contains(g["gene"].as_str().unwrap()))
        .collect();
    let scores_of = |column: &str| -> Vec<f64> {
        genes
            .iter()
            .map(|g| g[column].as_f64().unwrap_or(f64::NEG_INFINITY))
            .collect()
    };
    let ranking: Vec<f64> = genes
        .iter()
        .map(|g| -(g["rank"].as_u64().unwrap() as f64))
        .collect();
    let progress_auroc = auroc(&ranking, &positive).unwrap();
    let shift_auroc = auroc(&scores_of("goal_shift"), &positive).unwrap();
    // Random rankings of the same genes: a seeded shuffle, 2,000 times.
    let mut state = 0x5eed_u64;
    let mut random: Vec<f64> = (0..2000)
        .map(|_| {
            let shuffled: Vec<f64> = (0..genes.len())
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 11) as f64
                })
                .collect();
            auroc(&shuffled, &positive).unwrap()
        })
        .collect();
    random.sort_by(f64::total_cmp);
    let (median, p99) = (random[1000], random[1980]);
    let top: BTreeMap<u64, &str> = genes
        .iter()
        .filter(|g| g["rank"].as_u64().unwrap() <= 10)
        .map(|g| (g["rank"].as_u64().unwrap(), g["gene"].as_str().unwrap()))
        .collect();
    eprintln!(
        "AUROC for the top-50 stimulated-up genes: screen ranking (goal progress) {progress_auroc:.3}, cosine goal shift {shift_auroc:.3}; random rankings: median {median:.3}, 99th percentile {p99:.3}; top 10: {top:?}"
    );
    // Both beat the best 1% of random rankings by a stated margin.
    const MARGIN: f64 = 0.05;
    for (what, value) in [
        ("goal progress", progress_auroc),
        ("goal shift", shift_auroc),
    ] {
        assert!(
            value >= p99 + MARGIN,
            "{what}: AUROC {value:.3} does not beat random rankings' 99th percentile {p99:.3} by {MARGIN}"
        );
    }
}
