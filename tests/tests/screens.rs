//! In-silico knockout screens end to end with the real `cellfleet` binary on the real Kang IFN-beta
//! cells: bad specifications refused before any work, 1 and 2 workers agreeing exactly, a worker
//! SIGKILLed and the coordinator restarted (etcd) mid-screen without losing or repeating a (gene, cell)
//! pair, and a biology check against the genes differentially expressed between the conditions.

use std::collections::{HashMap, HashSet};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cellfleet_e2e::{
    cellfleet, cellfleet_ok, data, open_corpus, python, wait_for, EtcdServer, Process,
};
use cellfleet_shared::screen::stats::auroc;
use cellfleet_shared::screen::{ScreenPlan, TargetKind};
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
    /// The token layout it was pretrained in (`train --layout`).
    layout: String,
}

/// Pretrains once per build of the binary and shares the result between this file's tests (each runs in
/// its own process under nextest: the first takes a lock and trains, the others wait for it).
fn trained_kang() -> Trained {
    trained_kang_in("full")
}

/// `trained_kang` pretrained in token layout `layout` (`full` or `expressed`).
fn trained_kang_in(layout: &str) -> Trained {
    let binary = std::fs::read(bin()).unwrap();
    let key = &blake3::hash(&binary).to_hex()[..16];
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).unwrap();
    // 1000 steps: at 300 the trained model's ranking (AUROC 0.72 for the stimulated-up genes) does not
    // beat ranking genes by their mean expression (0.76); at 1000 it does (0.84), see the biology test.
    // The expressed layout's steps are about half as long (a Kang cell expresses about half of these 256
    // genes) and carry half the masked tokens; at 1000 steps its AUROC swung from 0.82 to 0.68 to 0.57
    // across three equally distributed orderings of the same samples, so it trains 2000 steps, about
    // the full layout's compute.
    let steps = if layout == "expressed" { 2000 } else { 1000 };
    let dir = root.join(format!("kang-screen-{key}-{layout}-{steps}"));
    let lock = std::fs::File::create(root.join(format!("kang-screen-{key}-{layout}-{steps}.lock")))
        .unwrap();
    // SAFETY: flock on a file descriptor this function owns; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let trained = Trained {
        corpus: s(&dir.join("corpus")),
        checkpoint: s(&dir.join("ckpt")),
        layout: layout.to_string(),
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
        pretrain_tiny(
            &trained.corpus,
            &dir,
            &trained.checkpoint,
            steps,
            32,
            "3e-3",
            0,
            layout,
        );
        std::fs::write(dir.join("ready"), "").unwrap();
    }
    trained
}

/// `cellfleet train` of the tiny preset on `corpus`, one worker and thread: the model under `dir/model`,
/// the checkpoints at `checkpoint`.
#[allow(clippy::too_many_arguments)]
fn pretrain_tiny(
    corpus: &str,
    dir: &Path,
    checkpoint: &str,
    steps: u64,
    batch_size: u32,
    lr: &str,
    seed: u64,
    layout: &str,
) {
    cellfleet_ok(
        bin(),
        &[
            "train",
            "--layout",
            layout,
            "--corpus",
            corpus,
            "--local",
            "--preset",
            "tiny",
            "--steps",
            &steps.to_string(),
            "--batch-size",
            &batch_size.to_string(),
            "--lr",
            lr,
            "--seed",
            &seed.to_string(),
            "--threads",
            "1",
            "--out",
            &s(&dir.join("model")),
            "--checkpoint",
            checkpoint,
        ],
    );
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

/// Gene sets beside 40 single genes (inline TOML).
const SETS_AND_SINGLES: &str = r#"{ singles = ["B2M", "ISG15", "ACTB", "ISG20", "CD74", "IFI6", "CXCL10", "IFIT1", "IFIT2", "IRF7", "LYZ"], sets = { ifit = ["IFIT1", "IFIT2", "IFIT3"], housekeeping = ["ACTB", "B2M"] } }"#;

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

/// Every cell's bins, by corpus position.
fn corpus_bins(corpus: &str) -> HashMap<u64, Vec<u8>> {
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
    bins
}

/// (target name, cell) records a knockout screen must cover, counted from the corpus itself: a gene or
/// a set in every selected cell that expresses one of its genes (bin > 0), a pair where both are.
fn expected_records(plan: &ScreenPlan, corpus: &str) -> HashSet<(String, u64)> {
    let bins = corpus_bins(corpus);
    let mut records = HashSet::new();
    for &cell in &plan.cells {
        for target in &plan.targets {
            let expressed: Vec<bool> = target
                .genes
                .iter()
                .map(|&g| bins[&cell][g as usize] > 0)
                .collect();
            let applies = match target.kind {
                TargetKind::Pair => expressed.iter().all(|&e| e),
                TargetKind::Gene | TargetKind::Set => expressed.iter().any(|&e| e),
            };
            if applies {
                records.insert((target.name.clone(), cell));
            }
        }
    }
    records
}

/// Checks the per-cell table holds every expected record exactly once.
fn assert_exactly_once(results: &Value, expected: &HashSet<(String, u64)>) {
    let mut seen = HashSet::new();
    for row in rows(results, "cells") {
        let record = (
            row["gene"].as_str().unwrap().to_string(),
            row["cell"].as_u64().unwrap(),
        );
        assert!(
            seen.insert(record.clone()),
            "record {record:?} appears twice"
        );
    }
    assert_eq!(seen.len(), expected.len(), "records in the per-cell table");
    assert!(
        seen == *expected,
        "the per-cell table covers other records than expected"
    );
}

/// The units each worker of a `screen run --out OUT` computed, from the `unit U/N:` lines of its log.
fn units_per_worker(out: &Path) -> Vec<usize> {
    let mut counts = Vec::new();
    let mut logs: Vec<PathBuf> = std::fs::read_dir(out.join("workers"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap();
        counts.push(
            text.lines()
                .filter(|l| l.contains(" unit ") && l.contains(" pairs in "))
                .count(),
        );
    }
    counts
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
        // Both workers took part: a 2-worker run where one worker computed everything would prove
        // nothing about agreement between workers.
        let units = units_per_worker(&out);
        assert_eq!(units.len(), workers.parse::<usize>().unwrap(), "{units:?}");
        assert!(units.iter().all(|&u| u >= 1), "units per worker: {units:?}");
        let record: Value =
            serde_json::from_slice(&std::fs::read(out.join("screen.json")).unwrap()).unwrap();
        assert!(
            record["checkpoint"]["step"].as_u64() == Some(1000),
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
        assert_exactly_once(&tables, &expected_records(&plan, &trained.corpus));
        results.push(tables);
    }
    let columns = results[0]["genes"]["columns"].clone();
    for expected in [
        "rank",
        "gene",
        "kind",
        "genes",
        "gene_id",
        "n_cells",
        "cosine_shift",
        "goal_shift",
        "shift_to_stimulated",
        "p_value",
        "fdr",
        "null_gene",
        "top_affected",
        "top_affected_delta_bin",
        "readout",
        "layer",
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

/// Spearman correlation of two equally long vectors (average ranks for ties).
fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            for k in i..=j {
                r[order[k]] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let mean = (a.len() as f64 - 1.0) / 2.0;
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        cov += (x - mean) * (y - mean);
        va += (x - mean) * (x - mean);
        vb += (y - mean) * (y - mean);
    }
    cov / (va * vb).sqrt()
}

/// Gene sets and an anchor's pairs with the AnnData output: anndata opens `cells.h5ad`, its rows are the
/// Parquet rows, and its control group's expected expression tracks the cells' input bins (the readout is
/// a trained quantity, not an untrained head read at unmasked tokens).
#[test]
fn sets_pairs_and_the_anndata_output_agree_with_the_parquet_tables() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let body = stimulated_toward_control(40, 16, 20)
        .replace(
            "genes = \"all\"",
            &format!("genes = {SETS_AND_SINGLES}\n[combinations]\nanchor = \"IFIT3\""),
        )
        .replace("per_cell = true", "per_cell = true\nanndata = true");
    let spec = write_spec(dir.path(), "sets", &trained, &body);
    let out = dir.path().join("results");
    let stdout = screen_run(&spec, "2", &out);
    assert!(stdout.contains("perturbations"), "{stdout}");
    let tables = read_results(&out);
    let plan = plan_of(&dir.path().join("sets.out"));
    assert_exactly_once(&tables, &expected_records(&plan, &trained.corpus));
    let genes = rows(&tables, "genes");
    let row = |name: &str| {
        genes
            .iter()
            .find(|g| g["gene"] == name)
            .unwrap_or_else(|| panic!("no row {name}"))
    };
    assert_eq!(row("ifit")["kind"], "set");
    // A set's genes in vocabulary order.
    let mut members: Vec<&str> = row("ifit")["genes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    members.sort_unstable();
    assert_eq!(members, ["IFIT1", "IFIT2", "IFIT3"]);
    assert!(row("ifit")["gene_id"].is_null());
    // Sets are tested against random sets of their size, which are the null and not rows.
    assert!(row("ifit")["p_value"]
        .as_f64()
        .is_some_and(|p| p > 0.0 && p <= 1.0));
    assert!(!genes
        .iter()
        .any(|g| g["gene"].as_str().unwrap().starts_with("null-set-")));
    assert_eq!(
        plan.targets
            .iter()
            .filter(|t| t.null && t.kind == TargetKind::Set)
            .count(),
        2 * 10,
        "10 random sets of each size (3 and 2)"
    );
    let pair = row("IFIT3+IFI6");
    assert_eq!(pair["kind"], "pair");
    for column in [
        "anchor_alone",
        "gene_alone",
        "interaction",
        "interaction_p_value",
    ] {
        assert!(
            pair[column].as_f64().is_some_and(f64::is_finite),
            "{column}: {pair}"
        );
    }
    assert!(row("IFI6")["interaction"].is_null());
    // The anchor alone and the pair are both reported; the anchor is not paired with itself.
    assert_eq!(row("IFIT3")["kind"], "gene");
    assert!(!genes.iter().any(|g| g["gene"] == "IFIT3+IFIT3"));
    // Per cell, the interaction is the pair's effect minus both genes alone.
    for record in rows(&tables, "cells")
        .iter()
        .filter(|r| r["kind"] == "pair")
    {
        let value = |c: &str| record[c].as_f64().unwrap();
        let expected = value("goal_progress") - value("anchor_alone") - value("gene_alone");
        assert!((value("interaction") - expected).abs() < 1e-5, "{record}");
    }

    let h5ad: Value = serde_json::from_str(&python("read_anndata.py", &[&s(&out)])).unwrap();
    assert_eq!(
        h5ad["records"].as_u64().unwrap() as usize,
        rows(&tables, "cells").len()
    );
    assert_eq!(
        h5ad["n_control"].as_u64().unwrap() as usize,
        plan.cells.len()
    );
    assert_eq!(h5ad["n_vars"], 256);
    assert!(
        h5ad["largest_difference"].as_f64().unwrap() == 0.0,
        "{}",
        h5ad["largest_difference"]
    );
    assert!(
        h5ad["compared_columns"].as_array().unwrap().len() >= 7,
        "{}",
        h5ad["compared_columns"]
    );
    for column in [
        "perturbation",
        "cell_name",
        "condition",
        "cell_type",
        "goal_progress",
    ] {
        assert!(
            h5ad["obs_columns"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == column),
            "{column} missing from {}",
            h5ad["obs_columns"]
        );
    }
    assert_eq!(h5ad["uns"]["readout"], "expected");
    assert!(h5ad["perturbed_x_finite"].as_bool().unwrap());

    // Unperturbed readouts track the input: per cell, the Spearman correlation of the expected bins with
    // the input bins (observed: lowest 0.75, median 0.87; a head trained at masked tokens only gave
    // 0.07-0.77, issue 14). Ties among the many zero bins keep it below 1.
    let bins = corpus_bins(&trained.corpus);
    let mut correlations: Vec<f64> = h5ad["control_cells"]
        .as_array()
        .unwrap()
        .iter()
        .zip(h5ad["control_x"].as_array().unwrap())
        .map(|(cell, x)| {
            let x: Vec<f64> = x
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let input: Vec<f64> = bins[&cell.as_u64().unwrap()]
                .iter()
                .map(|&b| f64::from(b))
                .collect();
            spearman(&x, &input)
        })
        .collect();
    correlations.sort_by(f64::total_cmp);
    let (lowest, median) = (correlations[0], correlations[correlations.len() / 2]);
    eprintln!("unperturbed readout vs input bins, Spearman per cell: lowest {lowest:.3}, median {median:.3}");
    assert!(
        median >= 0.8 && lowest >= 0.65,
        "lowest {lowest:.3}, median {median:.3}"
    );
}

fn status_json(url: &str, id: &str) -> Value {
    serde_json::from_str(&cellfleet_ok(
        bin(),
        &["screen", "status", id, "--coordinator", url, "--json"],
    ))
    .unwrap()
}

/// SIGKILLs one of `workers` that holds a lease of screen `id`, once at least `done` units are done.
fn kill_a_lease_holder(url: &str, id: &str, workers: &mut [Process], done: u64) {
    // The index of a worker that the coordinator lists as holding a lease, if any.
    let lease_holder = |status: &serde_json::Value, workers: &[Process]| {
        status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|holder| {
                workers.iter().position(|w| {
                    holder
                        .as_str()
                        .unwrap()
                        .contains(&format!("-{}-", w.child.id()))
                })
            })
    };
    // Units take milliseconds, so the fleet is stepped: thawed for a moment, then frozen (SIGSTOP) while
    // the coordinator's view is read, after any completion already sent has landed. A frozen worker
    // that the coordinator lists as a holder still holds that lease for certain; killing it loses it.
    // Stepping keeps the screen from running to its end between two looks (it did, on a loaded
    // machine, when only the holder was frozen and the other worker ran on).
    let mut victim = None;
    let mut thawed = Duration::from_millis(30);
    wait_for(
        "a few units done and a lease held",
        Duration::from_secs(240),
        || {
            workers.iter().for_each(|w| w.freeze(false));
            std::thread::sleep(thawed);
            workers.iter().for_each(|w| w.freeze(true));
            std::thread::sleep(Duration::from_millis(300));
            let status = status_json(url, id);
            assert!(
                status["state"] == "running",
                "the screen ended before a lease holder could be caught: {status}"
            );
            if status["units_done"].as_u64().unwrap() < done {
                // Not there yet: let the fleet run a little longer each time.
                thawed = (thawed * 2).min(Duration::from_millis(500));
                return false;
            }
            thawed = Duration::from_millis(30);
            victim = lease_holder(&status, workers);
            victim.is_some()
        },
    );
    let victim = victim.unwrap();
    for (i, worker) in workers.iter().enumerate() {
        if i != victim {
            worker.freeze(false);
        }
    }
    workers[victim].kill();
}

/// Submits `spec` to the coordinator at `url`, SIGKILLs one of `workers` holding a lease once 2 units
/// are done, and waits for the screen to complete with at least one unit released; returns its id.
fn submit_and_kill_a_lease_holder(url: &str, spec: &Path, workers: &mut [Process]) -> String {
    let id = cellfleet_ok(bin(), &["screen", "submit", &s(spec), "--coordinator", url])
        .trim()
        .to_string();
    kill_a_lease_holder(url, &id, workers, 2);
    wait_for("the screen to complete", Duration::from_secs(300), || {
        let status = status_json(url, &id);
        assert!(status["state"] != "failed", "{status}");
        status["state"] == "completed"
    });
    let status = status_json(url, &id);
    assert!(
        status["releases"].as_u64().unwrap() >= 1,
        "{}: {status}",
        spec.display()
    );
    id
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
    // Single genes, two gene sets and an anchor's pairs: every kind of target, exactly once.
    let body = stimulated_toward_control(96, 32, 16).replace(
        "genes = \"all\"",
        &format!("genes = {SETS_AND_SINGLES}\n[combinations]\nanchor = \"IFIT3\""),
    );
    let spec = write_spec(dir.path(), "screen", &trained, &body);
    let id = cellfleet_ok(
        bin(),
        &["screen", "submit", &s(&spec), "--coordinator", &url],
    )
    .trim()
    .to_string();
    assert!(id.starts_with("screen-"), "{id}");

    // SIGKILL a worker that holds a lease once some units are done.
    kill_a_lease_holder(&url, &id, &mut workers, 3);

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
    assert_exactly_once(&disturbed, &expected_records(&plan, &trained.corpus));
    let kinds: HashSet<&str> = rows(&disturbed, "genes")
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, HashSet::from(["gene", "set", "pair"]));

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

/// Randomly initialised models of the trained model's configuration, one per seed: `train` for one
/// step at a learning rate of 1e-30 writes a checkpoint whose weights are the initialisation (an update
/// that small is below the f32 resolution of every weight). Built once per binary, like the trained one.
fn random_kang_models(trained: &Trained, seeds: &[u64]) -> Vec<String> {
    let root = Path::new(&trained.checkpoint)
        .parent()
        .unwrap()
        .to_path_buf();
    let lock = std::fs::File::create(root.join("random.lock")).unwrap();
    // SAFETY: flock on a file descriptor this function owns; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    seeds
        .iter()
        .map(|seed| {
            let dir = root.join(format!("random-{seed}"));
            if !dir.join("ready").exists() {
                let _ = std::fs::remove_dir_all(&dir);
                let checkpoint = s(&dir.join("ckpt"));
                pretrain_tiny(
                    &trained.corpus,
                    &dir,
                    &checkpoint,
                    1,
                    4,
                    "1e-30",
                    *seed,
                    &trained.layout,
                );
                std::fs::write(dir.join("ready"), "").unwrap();
            }
            s(&dir.join("ckpt"))
        })
        .collect()
}

/// The AUROC with which a screen's ranking (its `rank` column, genes expressed in no screened cell last)
/// recovers `up` among the screened genes.
fn ranking_auroc(results: &Value, up: &HashSet<String>) -> f64 {
    let genes = rows(results, "genes");
    let positive: Vec<bool> = genes
        .iter()
        .map(|g| up.contains(g["gene"].as_str().unwrap()))
        .collect();
    let ranking: Vec<f64> = genes
        .iter()
        .map(|g| -(g["rank"].as_u64().unwrap() as f64))
        .collect();
    auroc(&ranking, &positive).unwrap()
}

/// The 50 genes most up in stimulated cells (Welch t on the h5ad's log-normalized values, computed
/// independently of cellfleet), among the corpus's vocabulary.
fn stimulated_up(trained: &Trained, dir: &Path) -> (Vec<String>, HashSet<String>) {
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(Path::new(&trained.corpus).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<String> = manifest["genes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().to_string())
        .collect();
    let vocabulary = dir.join("vocabulary.txt");
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
    (names, up.into_iter().collect())
}

/// One readout's figures: the trained model, randomly initialised ones, no model, random rankings.
fn readout_controls(readout: &str, layer: i32, cells: u32) -> (f64, Vec<f64>, f64, f64) {
    readout_controls_in("full", readout, layer, cells)
}

/// `readout_controls` for a model pretrained in token layout `layout`.
fn readout_controls_in(
    layout: &str,
    readout: &str,
    layer: i32,
    cells: u32,
) -> (f64, Vec<f64>, f64, f64) {
    let trained = trained_kang_in(layout);
    let dir = tempfile::tempdir().unwrap();
    let (names, up) = stimulated_up(&trained, dir.path());
    let body = stimulated_toward_control(cells, 64, 50)
        .replace("per_cell = true", "per_cell = false")
        .replace(
            "genes = \"all\"",
            &format!("genes = \"all\"\nreadout = \"{readout}\"\nlayer = {layer}"),
        );
    let screen = |checkpoint: &str, name: &str| -> Value {
        let spec = dir.path().join(name);
        std::fs::write(
            &spec,
            format!(
                "checkpoint = {checkpoint:?}\ncorpus = {:?}\nout = {:?}\nseed = 3\n{body}",
                trained.corpus,
                s(&dir.path().join(format!("{name}.out")))
            ),
        )
        .unwrap();
        let out = dir.path().join(format!("{name}-results"));
        screen_run(&spec, "2", &out);
        let results = read_results(&out);
        assert_eq!(rows(&results, "genes").len(), 256);
        assert!(rows(&results, "genes")
            .iter()
            .all(|g| g["readout"] == readout));
        results
    };
    let trained_results = screen(&trained.checkpoint, "trained");
    let trained_auroc = ranking_auroc(&trained_results, &up);
    let random_aurocs: Vec<f64> = random_kang_models(&trained, &[11, 12, 13, 14, 15])
        .iter()
        .enumerate()
        .map(|(i, checkpoint)| ranking_auroc(&screen(checkpoint, &format!("random{i}")), &up))
        .collect();

    // No model: genes ranked by their mean input bin in the screened cells.
    let plan = plan_of(&dir.path().join("trained.out"));
    let bins = corpus_bins(&trained.corpus);
    let mean_bin: Vec<f64> = (0..names.len())
        .map(|g| {
            plan.cells
                .iter()
                .map(|c| f64::from(bins[c][g]))
                .sum::<f64>()
                / plan.cells.len() as f64
        })
        .collect();
    let positive: Vec<bool> = names.iter().map(|g| up.contains(g)).collect();
    let no_model_auroc = auroc(&mean_bin, &positive).unwrap();

    // Random rankings of the same genes: a seeded shuffle, 2,000 times.
    let mut state = 0x5eed_u64;
    let mut random: Vec<f64> = (0..2000)
        .map(|_| {
            let shuffled: Vec<f64> = (0..names.len())
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
    let p99 = random[1980];
    let top: Vec<&str> = rows(&trained_results, "genes")
        .iter()
        .take(10)
        .map(|g| g["gene"].as_str().unwrap())
        .collect();
    eprintln!(
        "{layout} layout, readout {readout} (layer {layer}), {cells} stimulated cells toward control, AUROC for the top-50 stimulated-up genes: \
         trained {trained_auroc:.3}; randomly initialised (5 seeds) {random_aurocs:.3?}; no model (mean input bin) \
         {no_model_auroc:.3}; random rankings' 99th percentile {p99:.3}; trained top 10: {top:?}"
    );
    (trained_auroc, random_aurocs, no_model_auroc, p99)
}

/// The controls every claim of the screen rests on, at the default readout: what the trained model ranks
/// must be learned (above every randomly initialised model of its configuration), more than the
/// expression level itself (above ranking genes by their mean input bin), and real (above the random
/// rankings' 99th percentile), each by a stated margin.
#[test]
fn knockouts_that_move_stimulated_cells_toward_control_are_interferon_response_genes() {
    assert_controls_hold("full", readout_controls("expected", -1, 200));
}

/// The controls for a model pretrained in the expressed layout (a cell is its expressed genes and a
/// sample of unexpressed ones; a knockout removes the gene's token). A screen's sequences hold each
/// cell's expressed genes and the 64 goal genes that separate stimulated from control cells
/// (`query_genes`), so the expected readout sees them in every cell. Learned (above every randomly
/// initialised model) and real (above the random rankings' 99th percentile), by the 0.05 margin; above
/// ranking genes by mean expression without it. With the goal genes the trained model (2000 steps)
/// ranked at 0.811 against that ranking's 0.759, a margin the 0.05 would leave no room for; with the
/// random unexpressed sample alone (`query_genes = 0`, as before) at 0.705, below it. Two other
/// expressed-layout models (1000 steps) gained 0.06-0.08 the same way (0.817 to 0.874, 0.574 to 0.649).
#[test]
fn in_the_expressed_layout_knockouts_pass_the_learned_and_real_controls() {
    let figures = readout_controls_in("expressed", "expected", -1, 200);
    let (trained, _, no_model, _) = figures;
    eprintln!("expressed layout: trained {trained:.3} vs ranking by mean expression {no_model:.3}");
    assert!(
        trained > no_model,
        "expressed layout, expected readout: the trained model's AUROC {trained:.3} does not beat ranking by mean expression (no model, {no_model:.3})"
    );
    assert_controls(
        "expressed",
        figures,
        &[Control::RandomModels, Control::RandomRankings],
    );
}

fn assert_controls_hold(layout: &str, figures: (f64, Vec<f64>, f64, f64)) {
    assert_controls(
        layout,
        figures,
        &[
            Control::RandomModels,
            Control::NoModel,
            Control::RandomRankings,
        ],
    );
}

#[derive(PartialEq)]
enum Control {
    RandomModels,
    NoModel,
    RandomRankings,
}

fn assert_controls(layout: &str, figures: (f64, Vec<f64>, f64, f64), required: &[Control]) {
    let (trained, random_models, no_model, p99) = figures;
    const MARGIN: f64 = 0.05;
    let best_random = random_models.iter().copied().fold(f64::MIN, f64::max);
    for (control, what, bar) in [
        (
            Control::RandomModels,
            "the best randomly initialised model",
            best_random,
        ),
        (
            Control::NoModel,
            "ranking by mean expression (no model)",
            no_model,
        ),
        (
            Control::RandomRankings,
            "random rankings' 99th percentile",
            p99,
        ),
    ] {
        if !required.contains(&control) {
            continue;
        }
        assert!(
            trained >= bar + MARGIN,
            "{layout} layout, expected readout: the trained model's AUROC {trained:.3} does not beat {what} ({bar:.3}) by {MARGIN}"
        );
    }
}

/// Layer 0 of the mean readout is the token embeddings: a knockout changes only the knocked-out gene's
/// own token there, which the readout leaves out, so no cell may move; counting the own token (the old
/// measure) moves every cell. The `[CLS]` readout at the last layer runs and moves cells.
#[test]
fn at_the_token_embeddings_a_knockout_moves_nothing_but_its_own_token() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let genes = r#"genes = ["IFIT3", "ISG15", "LYZ", "B2M", "CD74", "ACTB"]"#;
    // Per record: the cosine shift and the goal progress (first order in the move, where the cosine
    // shift is second order).
    let shifts = |name: &str, extra: &str| -> Vec<(f64, f64)> {
        let body = stimulated_toward_control(30, 8, 30)
            .replace("genes = \"all\"", &format!("{genes}\n{extra}"));
        let spec = write_spec(dir.path(), name, &trained, &body);
        let out = dir.path().join(format!("{name}-results"));
        screen_run(&spec, "1", &out);
        rows(&read_results(&out), "cells")
            .iter()
            .map(|r| {
                (
                    r["cosine_shift"].as_f64().unwrap(),
                    r["goal_progress"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let left_out = shifts("mean0", "readout = \"mean\"\nlayer = 0");
    let counted = shifts(
        "mean0own",
        "readout = \"mean\"\nlayer = 0\ncount_own_genes = true",
    );
    let cls = shifts("cls", "readout = \"cls\"");
    assert_eq!(left_out.len(), counted.len());
    assert!(!left_out.is_empty());
    let largest = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        v.iter().fold(0.0f64, |m, x| m.max(pick(x).abs()))
    };
    let smallest_progress = counted.iter().fold(f64::MAX, |m, x| m.min(x.1.abs()));
    eprintln!(
        "layer 0, own token left out: largest |cosine shift| {:.2e}, |goal progress| {:.2e}; counted: largest {:.2e}, {:.2e}, \
         smallest |goal progress| {smallest_progress:.2e}; cls at the last layer: largest {:.2e}, {:.2e}",
        largest(&left_out, |x| x.0),
        largest(&left_out, |x| x.1),
        largest(&counted, |x| x.0),
        largest(&counted, |x| x.1),
        largest(&cls, |x| x.0),
        largest(&cls, |x| x.1),
    );
    assert!(largest(&left_out, |x| x.0) < 1e-6 && largest(&left_out, |x| x.1) < 1e-4);
    assert!(
        smallest_progress > 1e-3,
        "counting the own token moves every cell"
    );
    assert!(largest(&cls, |x| x.1) > 1e-2);
}

/// A steered screen's body: knockouts of three genes (and two null genes) in a few stimulated cells,
/// toward control, with short chains; `extra_steer` ends the `[steer]` table (and may open
/// `[steer.anchor]`, which is why `[steer]` comes last).
fn small_steer(extra_steer: &str) -> String {
    format!(
        r#"genes = ["ISG15", "IFI6", "B2M"]

[cells]
filter = {{ condition = "stimulated" }}
max_cells = 6

[goal]
column = "condition"
value = "control"
match_column = "cell_type"

[null]
genes = 2

[execution]
gene_block = 2
cell_block = 3
batch = 16
lease_seconds = 20
per_cell = true
anndata = true

[steer]
iterations = 12
burn_in = 4
chains = 2
block = 8
target_groups = 2
{extra_steer}
"#
    )
}

#[test]
fn bad_steer_specs_are_refused_before_any_work() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "temperature",
            small_steer("temperature = 0.0"),
            vec!["steer.temperature = 0", "positive"],
        ),
        (
            "burn-in",
            small_steer("").replace("burn_in = 4", "burn_in = 12"),
            vec!["steer.burn_in = 12", "steer.iterations = 12"],
        ),
        (
            "one-chain",
            small_steer("").replace("chains = 2", "chains = 1"),
            vec!["steer.chains = 1", "split R-hat"],
        ),
        (
            "no-clamped-genes",
            small_steer("clamp = \"bins\""),
            vec![
                "steer.clamp = \"bins\" with no steer.bins",
                "no gene would be clamped",
            ],
        ),
        (
            "bin-missing",
            small_steer("clamp = \"bins\"\nbins = { ISG15 = 3 }"),
            vec![
                "steer.bins has no bin for \"B2M\"",
                "every screened gene needs one",
            ],
        ),
        (
            "bin-range",
            small_steer("clamp = \"bins\"\nbins = { ISG15 = 60, IFI6 = 1, B2M = 1 }"),
            vec!["steer.bins.ISG15 = 60", "bins run from 0 to 49"],
        ),
        (
            "anchor-class",
            small_steer("[steer.anchor]\ncolumn = \"condition\"\nvalue = \"asleep\""),
            vec!["steer.anchor.value", "asleep"],
        ),
        (
            "anchor-column",
            small_steer("[steer.anchor]\ncolumn = \"donor\"\nvalue = \"A\""),
            vec!["steer.anchor.column", "donor"],
        ),
        (
            "readout",
            small_steer("").replace("genes = [", "readout = \"cls\"\ngenes = ["),
            vec!["readout = \"cls\" with [steer]"],
        ),
    ];
    assert_refused_before_any_work(&trained, dir.path(), cases);
}

/// Runs each `(name, spec body, expected error fragments)` case: refused, every fragment in the error,
/// and no plan stored.
fn assert_refused_before_any_work(
    trained: &Trained,
    dir: &Path,
    cases: Vec<(&str, String, Vec<&str>)>,
) {
    for (name, body, expect) in cases {
        let spec = write_spec(dir, &format!("{name}.toml"), trained, &body);
        let out = cellfleet(
            bin(),
            &["screen", "run", &s(&spec), "--local", "--workers", "1"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        for needle in expect {
            assert!(
                stderr.contains(needle),
                "{name}: expected {needle:?} in the error, got:\n{stderr}"
            );
        }
        let spec_out = PathBuf::from(format!("{}.out", spec.display()));
        assert!(
            !spec_out.join("plan.json").exists(),
            "{name}: a plan was stored"
        );
    }
}

/// The files of a steered screen's results that must be identical however the units were computed.
fn steered_outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    [
        "genes.parquet",
        "cells.parquet",
        "diagnostics.parquet",
        "acceptance.parquet",
        "traces.parquet",
    ]
    .iter()
    .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
    .collect()
}

#[test]
fn steered_chains_are_reproducible_clamped_and_the_same_on_one_and_two_workers() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "steer.toml", &trained, &small_steer(""));
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    let again = dir.path().join("again");
    screen_run(&spec, "1", &one);
    screen_run(&spec, "2", &two);
    screen_run(&spec, "1", &again);
    let reference = steered_outputs(&one);
    for (other, what) in [(&two, "2 workers"), (&again, "a second run")] {
        for ((name, a), (_, b)) in reference.iter().zip(steered_outputs(other)) {
            assert!(*a == b, "{name} differs between 1 worker and {what}");
        }
    }
    let plan = plan_of(&PathBuf::from(format!("{}.out", spec.display())));
    assert!(
        plan.unit_count() >= 4,
        "the units must be spread over workers"
    );
    // Clamped genes never move: in every knockout's predicted cells its gene is at bin 0; the chains
    // moved the rest; diagnostics cover every record.
    let checked = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg("-c")
        .arg(
            r#"
import sys, anndata, numpy as np, pandas as pd
a = anndata.read_h5ad(sys.argv[1] + "/cells.h5ad")
genes = list(a.var_names)
pert = np.asarray(a.obs["perturbation"], dtype=str)
control = a.X[pert == "control"]
moved = 0.0
for p in sorted(set(pert) - {"control"}):
    rows = a.X[pert == p]
    assert np.all(rows[:, genes.index(p)] == 0), f"{p} moved: {rows[:, genes.index(p)]}"
    moved = max(moved, float(np.abs(rows - control[: len(rows)]).max()))
assert moved > 0.5, f"no chain moved any gene (largest change {moved})"
d = pd.read_parquet(sys.argv[1] + "/diagnostics.parquet")
assert len(d) == int((pert != "control").sum()), (len(d), pert)
assert d["acceptance"].between(0, 1).all() and d["acceptance"].max() > 0
assert set(a.obs["converged"].astype(str)) <= {"true", "false", "control"}
print(len(d))
"#,
        )
        .arg(&one)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// The issue's question on real data: clamp a training fold of the genes up in stimulated cells at
/// their stimulated levels (per cell type) in control cells, and predict the rest. Compared on held-out
/// genes with the real stimulated cells, by numpy and by cell-eval, against the token edit at the same
/// clamps, the no-change baseline, and two controls: the same chains with the same genes clamped at
/// their control levels (the drift alone, which can fail the assertion below), and clamping random genes
/// at their stimulated levels.
#[test]
fn steering_toward_stimulated_is_measured_on_held_out_genes_with_cell_eval() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let (_, _) = stimulated_up(&trained, dir.path());
    let vocabulary = dir.path().join("vocabulary.txt");
    let up: Vec<String> = serde_json::from_str(&python(
        "kang_de.py",
        &[
            data("kang_ifnb_pbmc.h5ad").to_str().unwrap(),
            "condition",
            "stimulated",
            "control",
            "40",
            "--genes",
            &s(&vocabulary),
        ],
    ))
    .unwrap();
    // Folds by rank, alternating: chosen without looking at what the model predicts.
    let train: Vec<&String> = up.iter().step_by(2).collect();
    let held: Vec<&String> = up.iter().skip(1).step_by(2).collect();
    let folds = dir.path().join("folds.json");
    std::fs::write(
        &folds,
        serde_json::json!({ "train": train, "held": held }).to_string(),
    )
    .unwrap();
    // `clamp_at`: the state whose levels the clamped genes take (the goal); "control" clamps them at
    // the screened cells' own levels, which tells the chains nothing: what that run predicts is the
    // chains' drift alone.
    let body = |method: &str, clamp_at: &str, null_sets: u32| {
        format!(
            r#"genes = {{ sets = {{ ifn_train = {train:?} }} }}

[cells]
filter = {{ condition = "control" }}
max_cells = 21

[goal]
column = "condition"
value = "{clamp_at}"
match_column = "cell_type"

[null]
genes = 0
sets = {null_sets}

[steer]
method = "{method}"
clamp = "goal"
iterations = 60
burn_in = 20
chains = 4
block = 16
target_groups = 2

[execution]
gene_block = 1
cell_block = 7
batch = 32
anndata = true
"#
        )
    };
    let mut runs = Vec::new();
    for (name, method, clamp_at, null_sets) in [
        ("mcmc", "mcmc", "stimulated", 1),
        ("edit", "edit", "stimulated", 0),
        ("drift", "mcmc", "control", 0),
    ] {
        let spec = write_spec(
            dir.path(),
            &format!("{name}.toml"),
            &trained,
            &body(method, clamp_at, null_sets),
        );
        let out = dir.path().join(name);
        screen_run(&spec, "2", &out);
        runs.push(out);
    }
    let real = dir.path().join("real.h5ad");
    cellfleet_ok(
        bin(),
        &["corpus", "export", &trained.corpus, "--out", &s(&real)],
    );
    let cell_eval = std::env::var("CELL_EVAL").unwrap_or_else(|_| {
        format!(
            "{}/.cache/cellfleet/celleval/bin/cell-eval",
            std::env::var("HOME").unwrap()
        )
    });
    assert!(
        Path::new(&cell_eval).exists(),
        "cell-eval is not installed at {cell_eval} (scripts/setup.sh --for-tests installs it)"
    );
    let cells = |run: &Path| s(&run.join("cells.h5ad"));
    let report: Value = serde_json::from_str(&python(
        "steer_eval.py",
        &[
            &s(&real),
            &s(&folds),
            &s(&dir.path().join("eval")),
            &format!("mcmc={}@ifn_train", cells(&runs[0])),
            &format!("edit={}@ifn_train", cells(&runs[1])),
            &format!("random_clamp={}@null-set-20-0", cells(&runs[0])),
            &format!("drift={}@ifn_train", cells(&runs[2])),
            "--cell-eval",
            &cell_eval,
        ],
    ))
    .unwrap();
    eprintln!("steering on Kang (held-out genes): {report:#}");
    let m = &report["methods"];
    let f = |method: &str, key: &str| m[method][key].as_f64().unwrap();
    // numpy and cell-eval (each cell type against its own controls) agree on the Pearson correlation
    // and the mean squared error of the predicted change.
    for method in ["mcmc", "edit", "random_clamp", "drift"] {
        for (ours, theirs) in [("mse_all", "mse_delta"), ("pearson_all", "pearson_delta")] {
            let (a, b) = (
                f(method, ours),
                m[method]["cell_eval"][theirs].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() < 1e-3 * a.abs().max(0.01),
                "{method}: numpy {ours} {a}, cell-eval {theirs} {b}"
            );
        }
        assert_eq!(m[method]["cell_eval"]["cell_types_evaluated"], 7);
    }
    // The issue's assertion: MCMC beats no change on the held-out genes (observed MSE 72.8 against
    // 79.8, Pearson 0.36 against 0).
    assert!(
        f("mcmc", "mse_all") < f("no_change", "mse_all"),
        "MCMC does not beat no change: {report}"
    );
    assert!(f("mcmc", "pearson_all") > 0.1, "{report}");
    // The control that can fail: the same chains with the same genes clamped at the cells' own
    // (control) levels. Part of the gain over no change is this drift (Pearson 0.28 on all held-out
    // genes), but on the held-out interferon genes the stimulated clamp carries what the drift does
    // not (observed 0.37 against 0.03).
    assert!(
        f("mcmc", "pearson_up") > f("drift", "pearson_up") + 0.2,
        "the stimulated clamp adds nothing to the chains' drift on the held-out up genes: {report}"
    );
    // Reported, not asserted: whether it beats the token edit (on all held-out genes it does, on the
    // interferon genes it does not) and whether the interferon clamp does better than random genes
    // clamped at their stimulated levels (it does not): docs/steering.md.
    eprintln!(
        "MCMC vs token edit: pearson {:.3} vs {:.3}, mse {:.2} vs {:.2}; random-gene clamp: pearson {:.3}, mse {:.2}; drift alone: pearson {:.3}, mse {:.2}",
        f("mcmc", "pearson_all"),
        f("edit", "pearson_all"),
        f("mcmc", "mse_all"),
        f("edit", "mse_all"),
        f("random_clamp", "pearson_all"),
        f("random_clamp", "mse_all"),
        f("drift", "pearson_all"),
        f("drift", "mse_all"),
    );
}

/// A steered screen on a fleet under etcd loses a worker holding a lease mid-chain: its unit is leased
/// again and the results are bit for bit those of an undisturbed run (chains are reproducible), each
/// record exactly once.
#[test]
fn a_killed_worker_loses_no_steered_record() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let port = cellfleet_e2e::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = start_coordinator(dir.path(), port, &etcd.endpoint, "coordinator");
    let mut workers: Vec<Process> = (0..2)
        .map(|i| {
            Process::spawn(
                bin(),
                &["worker", "--coordinator", &url, "--threads", "1"],
                dir.path().join(format!("worker-{i}.log")),
            )
        })
        .collect();
    // One (gene, cell block of 1) per unit, long enough chains that a kill lands inside one.
    let body = small_steer("")
        .replace("gene_block = 2", "gene_block = 1")
        .replace("cell_block = 3", "cell_block = 1")
        .replace("lease_seconds = 20", "lease_seconds = 4")
        .replace("iterations = 12", "iterations = 40");
    let spec = write_spec(dir.path(), "steer", &trained, &body);
    let id = submit_and_kill_a_lease_holder(&url, &spec, &mut workers);
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
    let plan = plan_of(&dir.path().join("steer.out"));
    assert_exactly_once(
        &read_results(&out),
        &expected_records(&plan, &trained.corpus),
    );

    let quiet_spec = write_spec(dir.path(), "undisturbed", &trained, &body);
    let quiet = dir.path().join("undisturbed-results");
    screen_run(&quiet_spec, "1", &quiet);
    for ((name, a), (_, b)) in steered_outputs(&out).iter().zip(steered_outputs(&quiet)) {
        assert!(
            *a == b,
            "{name}: the disturbed screen differs from an undisturbed one"
        );
    }
}

/// A classifier fine-tuned on `condition` from the trained Kang model (`random: Some(seed)`: from a
/// randomly initialised model of the same configuration, its head trained for one step at a learning
/// rate of 1e-30, i.e. never). Built once per binary; returns its directory.
fn condition_classifier(trained: &Trained, random: Option<u64>) -> String {
    let root = Path::new(&trained.checkpoint)
        .parent()
        .unwrap()
        .to_path_buf();
    let lock = std::fs::File::create(root.join("classifier.lock")).unwrap();
    // SAFETY: flock on a file descriptor this function owns; released when `lock` is dropped.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let (name, base, steps, lr) = match random {
        None => (
            "classifier-condition".to_string(),
            root.join("model"),
            "300",
            "2e-3",
        ),
        Some(seed) => {
            let checkpoint = random_kang_models(trained, &[seed]).remove(0);
            (
                format!("classifier-random-{seed}"),
                Path::new(&checkpoint).parent().unwrap().join("model"),
                "1",
                "1e-30",
            )
        }
    };
    let dir = root.join(name);
    if !dir.join("ready").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let report = cellfleet_ok(
            bin(),
            &[
                "finetune",
                "--corpus",
                &trained.corpus,
                "--weights",
                &s(&base),
                "--label-col",
                "condition",
                "--steps",
                steps,
                "--batch-size",
                "32",
                "--lr",
                lr,
                "--threads",
                "1",
                "--out",
                &s(&dir.join("model")),
            ],
        );
        eprintln!("{report}");
        std::fs::write(dir.join("ready"), "").unwrap();
    }
    s(&dir.join("model"))
}

/// A transitions screen of every vocabulary gene's knockout in up to `cells` cells of both conditions.
fn transitions_body(classifier: &str, cells: u32, extra: &str) -> String {
    format!(
        r#"genes = "all"

[cells]
max_cells = {cells}

[null]
genes = 20

[execution]
gene_block = 64
cell_block = 20
batch = 32
lease_seconds = 20

[transitions]
classifier = {classifier:?}
{extra}
"#
    )
}

/// The AUROCs of 2,000 seeded random rankings of genes labelled `positive`, sorted.
fn random_ranking_aurocs(positive: &[bool]) -> Vec<f64> {
    let mut state = 0x5eed_u64;
    let mut random: Vec<f64> = (0..2000)
        .map(|_| {
            let shuffled: Vec<f64> = (0..positive.len())
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 11) as f64
                })
                .collect();
            auroc(&shuffled, positive).unwrap()
        })
        .collect();
    random.sort_by(f64::total_cmp);
    random
}

/// `transitions.json` and the rows of `transitions.parquet` of a results directory.
fn read_transitions(dir: &Path) -> (Value, Vec<Value>) {
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.join("transitions.json")).unwrap()).unwrap();
    let results = read_results(dir);
    (summary, rows(&results, "transitions").clone())
}

/// Per gene, the change of P(start -> state) a knockout makes (genes it never applied to: 0).
fn transition_changes(rows: &[Value], start: &str, state: &str) -> HashMap<String, f64> {
    rows.iter()
        .filter(|r| r["start"] == start && r["state"] == state && r["kind"] == "gene")
        .map(|r| {
            (
                r["perturbation"].as_str().unwrap().to_string(),
                r["change"].as_f64().unwrap_or(0.0),
            )
        })
        .collect()
}

#[test]
fn bad_transition_specs_are_refused_before_any_work() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let classifier = condition_classifier(&trained, None);
    let pretrained = Path::new(&trained.checkpoint)
        .parent()
        .unwrap()
        .join("model");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown-start",
            transitions_body(&classifier, 20, "start = [\"asleep\"]"),
            vec![
                "transitions",
                "\"asleep\"",
                "is not a state of the classifier",
            ],
        ),
        (
            "start-without-cells",
            transitions_body(&classifier, 20, "start = [\"control\"]").replace(
                "[cells]",
                "[cells]\nfilter = { condition = \"stimulated\" }",
            ),
            vec!["no screened cell starts in \"control\""],
        ),
        (
            "not-a-classifier",
            transitions_body(&s(&pretrained), 20, ""),
            vec!["has no classifier", "--label-col"],
        ),
        (
            "threshold",
            transitions_body(&classifier, 20, "terminate_below = 1.5"),
            vec!["transitions.terminate_below = 1.5"],
        ),
        (
            "missing-classifier",
            transitions_body(&s(&dir.path().join("nowhere")), 20, ""),
            vec!["transitions.classifier", "model.json"],
        ),
        (
            "attribution-without-contrast",
            attribution_body(&classifier, 20, "padding")
                .replace("reference = \"padding\"", "reference = \"contrast\""),
            vec!["needs attribution.contrast"],
        ),
        (
            "attribution-contrast-is-the-class",
            attribution_body(&classifier, 20, "contrast")
                .replace("contrast = \"control\"", "contrast = \"stimulated\""),
            vec!["attribution.contrast = \"stimulated\" is the attributed class itself"],
        ),
        (
            "attribution-unknown-class",
            attribution_body(&classifier, 20, "padding")
                .replace("class = \"stimulated\"", "class = \"asleep\""),
            vec!["\"asleep\" is not a state of the classifier"],
        ),
        (
            "attribution-unknown-match-column",
            attribution_body(&classifier, 20, "contrast")
                .replace("match_column = \"cell_type\"", "match_column = \"donor\""),
            vec!["attribution.match_column", "\"donor\""],
        ),
        (
            "attribution-steps",
            attribution_body(&classifier, 20, "padding") + "steps = 0\n",
            vec!["attribution.steps = 0"],
        ),
    ];
    assert_refused_before_any_work(&trained, dir.path(), cases);
}

/// KD-CPT on Kang: the condition classifier's transition matrix is dominated by its diagonal; the
/// knockouts ranked by how much they raise P(stimulated -> control) recover the genes up in stimulated
/// cells (computed from the h5ad by `kang_de.py`) above the random rankings' 99th percentile, and the
/// same screen through a randomly initialised classifier does not. The screen runs on 2 workers and
/// again on 1: every output is identical.
#[test]
fn knockouts_that_end_the_stimulated_state_are_interferon_genes_and_a_random_classifier_finds_none()
{
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let (names, up) = stimulated_up(&trained, dir.path());
    let screen = |classifier: &str, name: &str, workers: &str| -> PathBuf {
        let spec = write_spec(
            dir.path(),
            name,
            &trained,
            &transitions_body(classifier, 60, "terminate_below = 0.5"),
        );
        let out = dir.path().join(format!("{name}-results"));
        screen_run(&spec, workers, &out);
        out
    };
    let classifier = condition_classifier(&trained, None);
    let two = screen(&classifier, "trained", "2");
    let (summary, rows) = read_transitions(&two);
    let states: Vec<&str> = summary["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut sorted = states.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["control", "stimulated"]);
    assert_eq!(
        summary["starts"], summary["states"],
        "every class is a start state"
    );
    let matrix = &summary["baseline"]["matrix"];
    let p = |i: usize, j: usize| matrix[i][j].as_f64().unwrap();
    for i in 0..2 {
        assert!((p(i, 0) + p(i, 1) - 1.0).abs() < 1e-5, "row {i} sums to 1");
    }
    assert!(
        p(0, 0) > 0.6 && p(1, 1) > 0.6,
        "the diagonal dominates: {states:?} {matrix}"
    );
    let overall = summary["baseline"]["overall_entropy"].as_f64().unwrap();
    assert!(overall > 0.0 && overall < std::f64::consts::LN_2);
    // 256 genes x 2 starts x 2 states, every row with its statistics.
    assert_eq!(rows.len(), 256 * 4);

    let positive: Vec<bool> = names.iter().map(|g| up.contains(g)).collect();
    let random = random_ranking_aurocs(&positive);
    let p99 = random[1980];
    let auroc_of = |rows: &[Value]| -> f64 {
        let changes = transition_changes(rows, "stimulated", "control");
        let scores: Vec<f64> = names
            .iter()
            .map(|g| changes.get(g).copied().unwrap_or(0.0))
            .collect();
        auroc(&scores, &positive).unwrap()
    };
    let trained_auroc = auroc_of(&rows);
    // Randomly initialised classifiers: knockouts of the genes that differ between the conditions move
    // any classifier's output, in a direction set by its random head, so their AUROCs spread on both
    // sides of 0.5 (0.29, 0.69, 0.38 and 0.29 for seeds 21-24; seed 22 is above the random rankings'
    // 99th percentile): the trained classifier must beat each of them, not only the random rankings.
    let mut random_aurocs = Vec::new();
    let mut random_summary = Value::Null;
    for seed in [21, 22] {
        let random_classifier = condition_classifier(&trained, Some(seed));
        let (summary, random_rows) =
            read_transitions(&screen(&random_classifier, &format!("random-{seed}"), "2"));
        random_aurocs.push(auroc_of(&random_rows));
        random_summary = summary;
    }
    let mut top: Vec<(String, f64)> = transition_changes(&rows, "stimulated", "control")
        .into_iter()
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let significant = rows
        .iter()
        .filter(|r| r["start"] == "stimulated" && r["state"] == "control")
        .filter(|r| r["fdr"].as_f64().is_some_and(|q| q < 0.05))
        .count();
    let terminated = rows.iter().filter(|r| r["terminated"] == true).count();
    eprintln!(
        "transitions: baseline {matrix} (overall entropy {overall:.3}; random classifier {}); \
         AUROC of P(stimulated -> control) changes for the 50 stimulated-up genes: trained {trained_auroc:.3}, \
         randomly initialised classifiers {random_aurocs:.3?}, random rankings' 99th percentile {p99:.3}; \
         {significant} knockouts at FDR < 0.05; {terminated} terminated transitions at 0.5; top 10: {:?}",
        random_summary["baseline"]["matrix"],
        &top[..10]
    );
    assert!(
        trained_auroc > p99,
        "the trained classifier's AUROC {trained_auroc:.3} is not above random rankings' 99th percentile {p99:.3}"
    );
    for random in &random_aurocs {
        assert!(
            trained_auroc > random + 0.05,
            "a randomly initialised classifier's ranking ({random:.3}) is within 0.05 of the trained one's ({trained_auroc:.3})"
        );
    }

    // The same screen on 1 worker: every output byte-identical.
    let one = screen(&classifier, "trained-one", "1");
    for file in ["transitions.parquet", "transitions.json", "genes.parquet"] {
        let a = std::fs::read(two.join(file)).unwrap();
        let b = std::fs::read(one.join(file)).unwrap();
        assert!(a == b, "{file} differs on 1 and 2 workers");
    }
}

/// An attribution screen of up to `cells` stimulated cells, the stimulated logit of `classifier`
/// against `reference` (`contrast`: a control cell of the same cell type).
fn attribution_body(classifier: &str, cells: u32, reference: &str) -> String {
    let contrast = if reference == "contrast" {
        "contrast = \"control\"\nmatch_column = \"cell_type\"\n"
    } else {
        ""
    };
    format!(
        r#"genes = "all"

[cells]
filter = {{ condition = "stimulated" }}
max_cells = {cells}

[execution]
cell_block = 16
batch = 16
lease_seconds = 20

[attribution]
classifier = {classifier:?}
class = "stimulated"
reference = "{reference}"
{contrast}"#
    )
}

/// The genes of an attribution results directory, most important first, and the AUROCs with which
/// their importance, signed and absolute, recovers `up`.
fn attribution_auroc(
    dir: &Path,
    names: &[String],
    up: &HashSet<String>,
) -> (f64, f64, Vec<String>) {
    let results = read_results(dir);
    let table = rows(&results, "attribution");
    assert_eq!(table.len(), names.len(), "one row per vocabulary gene");
    let importance: HashMap<&str, f64> = table
        .iter()
        .map(|r| {
            (
                r["gene"].as_str().unwrap(),
                r["importance"].as_f64().unwrap(),
            )
        })
        .collect();
    let absolute: HashMap<&str, f64> = table
        .iter()
        .map(|r| {
            (
                r["gene"].as_str().unwrap(),
                r["abs_importance"].as_f64().unwrap(),
            )
        })
        .collect();
    let scores: Vec<f64> = names.iter().map(|g| importance[g.as_str()]).collect();
    let magnitudes: Vec<f64> = names.iter().map(|g| absolute[g.as_str()]).collect();
    let positive: Vec<bool> = names.iter().map(|g| up.contains(g)).collect();
    let mut ranked: Vec<&Value> = table.iter().collect();
    ranked.sort_by_key(|r| r["rank"].as_u64().unwrap());
    (
        auroc(&scores, &positive).unwrap(),
        auroc(&magnitudes, &positive).unwrap(),
        ranked
            .iter()
            .map(|r| r["gene"].as_str().unwrap().to_string())
            .collect(),
    )
}

/// The gene-selection paper's attribution on Kang, with controls that can fail. The contrast reference
/// (a control cell of the same cell type, both directions averaged) builds the answer in: the genes that
/// differ between a stimulated cell and its control get attributions under any model, with a sign set by
/// the model (randomly initialised classifiers rank the stimulated-up genes at AUROC 0.06-0.79 with it,
/// depending on their head's sign), so its AUROC is reported, asserted only above random rankings, and
/// completeness is checked on it (16 path points: the attributions sum to the logit gap). The padding
/// reference builds nothing in: there the trained classifier's absolute attribution must rank the
/// stimulated-up genes above the random rankings' 99th percentile and above every randomly initialised
/// classifier's. 2 workers and 1 give the same bytes.
#[test]
fn attribution_of_the_stimulated_logit_ranks_interferon_genes_and_a_random_classifier_does_not() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let (names, up) = stimulated_up(&trained, dir.path());
    let run = |classifier: &str, name: &str, reference: &str, workers: &str| -> PathBuf {
        let spec = write_spec(
            dir.path(),
            name,
            &trained,
            &attribution_body(classifier, 60, reference),
        );
        let out = dir.path().join(format!("{name}-results"));
        screen_run(&spec, workers, &out);
        out
    };
    let classifier = condition_classifier(&trained, None);
    let contrast = run(&classifier, "contrast", "contrast", "2");
    let (contrast_auroc, _, top) = attribution_auroc(&contrast, &names, &up);
    let (_, padding_auroc, padding_top) =
        attribution_auroc(&run(&classifier, "padding", "padding", "2"), &names, &up);
    let mut random_contrast = Vec::new();
    let mut random_padding = Vec::new();
    for seed in [21, 22] {
        let random_classifier = condition_classifier(&trained, Some(seed));
        let (signed, _, _) = attribution_auroc(
            &run(
                &random_classifier,
                &format!("random-{seed}"),
                "contrast",
                "2",
            ),
            &names,
            &up,
        );
        let (_, absolute, _) = attribution_auroc(
            &run(
                &random_classifier,
                &format!("random-padding-{seed}"),
                "padding",
                "2",
            ),
            &names,
            &up,
        );
        random_contrast.push(signed);
        random_padding.push(absolute);
    }
    let positive: Vec<bool> = names.iter().map(|g| up.contains(g)).collect();
    let p99 = random_ranking_aurocs(&positive)[1980];

    // Completeness on the real model: the attributions carry the logit gap between cell and reference.
    let results = read_results(&contrast);
    let pairs = rows(&results, "attribution_pairs");
    assert_eq!(pairs.len(), 60);
    let gaps: Vec<f64> = pairs
        .iter()
        .map(|r| r["logit_gap"].as_f64().unwrap())
        .collect();
    let sums: Vec<f64> = pairs
        .iter()
        .map(|r| r["attribution_sum"].as_f64().unwrap())
        .collect();
    let mean_gap = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let mean_sum = sums.iter().sum::<f64>() / sums.len() as f64;
    let correlation = {
        let (mg, ms) = (mean_gap, mean_sum);
        let cov: f64 = gaps
            .iter()
            .zip(&sums)
            .map(|(g, s)| (g - mg) * (s - ms))
            .sum();
        let vg: f64 = gaps.iter().map(|g| (g - mg).powi(2)).sum();
        let vs: f64 = sums.iter().map(|s| (s - ms).powi(2)).sum();
        cov / (vg * vs).sqrt()
    };
    eprintln!(
        "attribution of the stimulated logit (16 path points), AUROC for the 50 stimulated-up genes: contrast reference (signed) {contrast_auroc:.3}, \
         randomly initialised classifiers {random_contrast:.3?} (the contrast builds the genes in; the sign is the model's); \
         padding reference (|importance|) {padding_auroc:.3}, randomly initialised classifiers {random_padding:.3?}; random rankings' 99th percentile {p99:.3}; \
         completeness: mean logit gap {mean_gap:.3} vs mean attribution sum {mean_sum:.3} (correlation over cells {correlation:.3}); \
         top 10 (contrast) {:?}, (padding) {:?}",
        &top[..10],
        &padding_top[..10]
    );
    assert!(
        mean_gap > 1.0,
        "stimulated cells' stimulated logit is not clearly above their controls' ({mean_gap:.3})"
    );
    assert!(
        (mean_sum / mean_gap - 1.0).abs() < 0.25 && correlation > 0.9,
        "the attributions do not add up to the logit gap: {mean_sum:.3} vs {mean_gap:.3}, correlation {correlation:.3}"
    );
    assert!(
        contrast_auroc > p99,
        "attribution's AUROC {contrast_auroc:.3} is not above random rankings' 99th percentile {p99:.3}"
    );
    assert!(
        padding_auroc > p99,
        "with the padding reference the trained classifier's AUROC {padding_auroc:.3} is not above random rankings' 99th percentile {p99:.3}"
    );
    for (seed, random) in [21, 22].iter().zip(&random_padding) {
        assert!(
            padding_auroc > *random + 0.05,
            "with the padding reference a randomly initialised classifier (seed {seed}) ranks the genes at {random:.3}, the trained one at {padding_auroc:.3}"
        );
    }

    // Pruning curves: dropping the least important genes first keeps the classifier above random order.
    let pruned = dir.path().join("pruning");
    println!(
        "{}",
        cellfleet_ok(
            bin(),
            &[
                "screen",
                "prune",
                &s(&contrast),
                "--out",
                &s(&pruned),
                "--max-cells",
                "200",
            ],
        )
    );
    let curves: Value = serde_json::from_str(&python(
        "read_table.py",
        &[&s(&pruned.join("pruning.parquet"))],
    ))
    .unwrap();
    let curve = |order: &str, metric: &str| -> Vec<f64> {
        curves
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["order"] == order)
            .map(|r| r[metric].as_f64().unwrap())
            .collect()
    };
    let area = |order: &str| curve(order, "accuracy_area")[0];
    let (by_attribution, by_random, by_hvg) = (
        curve("attribution_least_first", "accuracy"),
        curve("random", "accuracy"),
        curve("hvg_least_first", "accuracy"),
    );
    assert_eq!(by_attribution.len(), 10);
    let above_both = (1..by_attribution.len())
        .filter(|&i| by_attribution[i] >= by_random[i] && by_attribution[i] >= by_hvg[i])
        .count();
    eprintln!(
        "pruning (accuracy area; dropped first): attribution least important {:.3}, most important {:.3}, HVG least variable {:.3}, most variable {:.3}, random {:.3}; attribution at or above random and HVG at {above_both} of 9 pruned fractions",
        area("attribution_least_first"),
        area("attribution_most_first"),
        area("hvg_least_first"),
        area("hvg_most_first"),
        area("random")
    );
    assert!(
        std::fs::read_to_string(pruned.join("pruning.svg"))
            .unwrap()
            .contains("<polyline"),
        "the picture has curves"
    );
    assert!(
        area("attribution_least_first") > area("random"),
        "dropping the least important genes first does not beat random order"
    );
    assert!(
        area("attribution_least_first") > area("attribution_most_first"),
        "the attribution order is not better kept than reversed"
    );

    let one = run(&classifier, "contrast-one", "contrast", "1");
    for file in [
        "attribution.parquet",
        "attribution_cells.parquet",
        "attribution_pairs.parquet",
        "attribution_ranking.json",
    ] {
        let a = std::fs::read(contrast.join(file)).unwrap();
        let b = std::fs::read(one.join(file)).unwrap();
        assert!(a == b, "{file} differs on 1 and 2 workers");
    }
}

/// The top `n` genes of a screen's gene table.
fn top_hits(dir: &Path, n: usize) -> Vec<String> {
    rows(&read_results(dir), "genes")
        .iter()
        .take(n)
        .map(|g| g["gene"].as_str().unwrap().to_string())
        .collect()
}

/// The (target, cell) records a screen computed, from its `screen.json`.
fn screen_records(dir: &Path) -> u64 {
    let record: Value =
        serde_json::from_slice(&std::fs::read(dir.join("screen.json")).unwrap()).unwrap();
    record["pairs"].as_u64().unwrap()
}

/// Attribution-guided screens on Kang: each stimulated cell knocked out only in its top-k genes by the
/// stimulated logit's attribution, against the full screen of every gene in the same cells (both toward
/// control, self-effect excluded): the recall of the full screen's top 50 hits among the guided screen's
/// top 50, and the forward passes each ran. The same guidance from a randomly initialised classifier is
/// the control, and it shows the saving comes from the contrast reference, not from what the classifier
/// learned (see the assertion's comment).
#[test]
fn attribution_guided_screens_recover_the_full_screens_hits_for_a_fraction_of_the_forward_passes() {
    let trained = trained_kang();
    let dir = tempfile::tempdir().unwrap();
    let cells = 60;
    let timed_run = |name: &str, body: &str| -> (PathBuf, f64) {
        let spec = write_spec(dir.path(), name, &trained, body);
        let out = dir.path().join(format!("{name}-results"));
        let started = std::time::Instant::now();
        screen_run(&spec, "2", &out);
        (out, started.elapsed().as_secs_f64())
    };
    let full_body =
        stimulated_toward_control(cells, 64, 20).replace("per_cell = true", "per_cell = false");
    let (full, full_seconds) = timed_run("full", &full_body);
    let full_top = top_hits(&full, 50);
    let full_records = screen_records(&full);
    let classifier = condition_classifier(&trained, None);
    let random_classifier = condition_classifier(&trained, Some(21));
    let mut report = Vec::new();
    let mut recall_at = HashMap::new();
    for (guide, classifier) in [("trained", &classifier), ("random", &random_classifier)] {
        let (ranking, attribution_seconds) = timed_run(
            &format!("attribution-{guide}"),
            &attribution_body(classifier, cells, "contrast"),
        );
        for k in [5u32, 10, 20, 40] {
            let body = full_body.replace(
                "genes = \"all\"",
                &format!("genes = {{ attribution = {:?}, top_k = {k} }}", s(&ranking)),
            );
            let (guided, seconds) = timed_run(&format!("guided-{guide}-{k}"), &body);
            let plan = plan_of(&dir.path().join(format!("guided-{guide}-{k}.out")));
            assert_eq!(
                plan.cells.len(),
                cells as usize,
                "the same cells as the full screen"
            );
            assert!(plan.guided_genes.iter().all(|g| g.len() <= k as usize));
            let top: HashSet<String> = top_hits(&guided, 50).into_iter().collect();
            let recall = full_top.iter().filter(|g| top.contains(*g)).count() as f64 / 50.0;
            let records = screen_records(&guided);
            recall_at.insert((guide, k), recall);
            report.push(format!(
                "{guide} k={k}: recall {recall:.2}, {records} records ({:.0}% of the full screen's), {seconds:.0}s + attribution {attribution_seconds:.0}s",
                100.0 * records as f64 / full_records as f64
            ));
        }
    }
    eprintln!(
        "attribution-guided screens vs the full screen ({full_records} records, {full_seconds:.0}s) of {cells} stimulated cells toward control:\n  {}",
        report.join("\n  ")
    );
    // What holds: at k = 40 the guided screen finds most of the full screen's hits for under half of
    // its forward passes. What does not: guidance by a randomly initialised classifier does about as well
    // (k = 20: 0.78 against the trained 0.72 in one run, 0.74 against 0.82 in another), because the
    // contrast reference already picks each cell's genes that differ from its matched control cell, and
    // those are most of what the knockout ranking finds. Reported, not claimed.
    // k beyond the vocabulary is refused before any work, naming the field.
    let too_many = full_body.replace(
        "genes = \"all\"",
        &format!(
            "genes = {{ attribution = {:?}, top_k = 300 }}",
            s(&dir.path().join("attribution-trained-results"))
        ),
    );
    let spec = write_spec(dir.path(), "too-many", &trained, &too_many);
    let refused = cellfleet(
        bin(),
        &["screen", "run", &s(&spec), "--local", "--workers", "1"],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("genes.top_k = 300: larger than the vocabulary of 256 genes"),
        "{stderr}"
    );
    // The overall mode: every cell in the same top genes of the mean attribution.
    let overall = full_body.replace(
        "genes = \"all\"",
        &format!(
            "genes = {{ attribution = {:?}, top_k = 40, overall = true }}",
            s(&dir.path().join("attribution-trained-results"))
        ),
    );
    let (overall_out, _) = timed_run("guided-overall", &overall);
    let plan = plan_of(&dir.path().join("guided-overall.out"));
    assert!(plan
        .guided_genes
        .iter()
        .all(|g| *g == plan.guided_genes[0] && g.len() == 40));
    let top: HashSet<String> = top_hits(&overall_out, 50).into_iter().collect();
    let overall_recall = full_top.iter().filter(|g| top.contains(*g)).count() as f64 / 50.0;
    eprintln!(
        "overall top 40 by mean attribution: recall {overall_recall:.2}, {} records",
        screen_records(&overall_out)
    );
    let trained_40 = recall_at[&("trained", 40)];
    assert!(
        trained_40 >= 0.75,
        "at k = 40 the guided screen recalls only {trained_40:.2} of the full screen's top 50"
    );
    assert!(
        recall_at[&("trained", 5)] < trained_40,
        "recall does not grow with k: the guidance changed nothing"
    );
}

/// Transitions and attribution units under etcd: a worker SIGKILLed while it holds a lease of each
/// screen loses nothing and repeats nothing (every record exactly once), and the merged outputs are
/// byte-identical to an undisturbed run on one worker.
#[test]
fn transition_and_attribution_units_survive_a_killed_worker_exactly_once() {
    let trained = trained_kang();
    let classifier = condition_classifier(&trained, None);
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start();
    let port = cellfleet_e2e::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = start_coordinator(dir.path(), port, &etcd.endpoint, "coordinator");
    let spawn_workers = |tag: &str| -> Vec<Process> {
        (0..2)
            .map(|i| {
                Process::spawn(
                    bin(),
                    &["worker", "--coordinator", &url, "--threads", "1"],
                    dir.path().join(format!("worker-{tag}-{i}.log")),
                )
            })
            .collect()
    };
    let transitions = transitions_body(&classifier, 40, "terminate_below = 0.5")
        .replace(
            "genes = \"all\"",
            "genes = [\"ISG15\", \"IFI6\", \"B2M\", \"IFIT3\", \"CD74\", \"LYZ\"]",
        )
        .replace("gene_block = 64", "gene_block = 2")
        .replace("cell_block = 20", "cell_block = 4")
        .replace("lease_seconds = 20", "lease_seconds = 4")
        .replace("[null]\ngenes = 20", "[null]\ngenes = 4");
    let attribution = attribution_body(&classifier, 48, "contrast")
        .replace("cell_block = 16", "cell_block = 2")
        .replace("batch = 16", "batch = 2")
        .replace("lease_seconds = 20", "lease_seconds = 4");
    for (name, body, files) in [
        (
            "transitions",
            transitions,
            &["transitions.parquet", "transitions.json", "genes.parquet"][..],
        ),
        (
            "attribution",
            attribution,
            &[
                "attribution.parquet",
                "attribution_pairs.parquet",
                "attribution_ranking.json",
            ][..],
        ),
    ] {
        let mut workers = spawn_workers(name);
        let spec = write_spec(dir.path(), name, &trained, &body);
        let id = submit_and_kill_a_lease_holder(&url, &spec, &mut workers);
        let out = dir.path().join(format!("{name}-results"));
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
            ],
        );
        let quiet_spec = write_spec(dir.path(), &format!("{name}-undisturbed"), &trained, &body);
        let quiet = dir.path().join(format!("{name}-undisturbed-results"));
        screen_run(&quiet_spec, "1", &quiet);
        for file in files {
            let a = std::fs::read(out.join(file)).unwrap();
            let b = std::fs::read(quiet.join(file)).unwrap();
            assert!(
                a == b,
                "{name}: {file} of the disturbed screen differs from an undisturbed one"
            );
        }
        drop(workers);
    }
}
