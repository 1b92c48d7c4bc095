//! End-to-end tests of the model: the real `cellfleet train|finetune|eval` on the real Kang data, checked
//! against baselines the tests compute themselves, and against plain PyTorch loading the same weights.

use std::collections::BTreeMap;
use std::path::Path;

use cellfleet_e2e::{data, decode_all, open_corpus, python};
use cellfleet_shared::stream::{CellSplit, SplitPart};
use cellfleet_worker::model::{Mode, Pooling, Tokens};
use cellfleet_worker::train::batches::batch_tensors;
use cellfleet_worker::train::saved_model::SavedModel;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cellfleet"))
}

fn cellfleet_ok(args: &[&str]) -> String {
    cellfleet_e2e::cellfleet_ok(bin(), args)
}

fn cellfleet_err(args: &[&str]) -> String {
    let out = cellfleet_e2e::cellfleet(bin(), args);
    assert!(!out.status.success(), "cellfleet {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Ingests Kang with `hvg` genes into `dir/kang`; returns its path.
fn ingest_kang(dir: &Path, hvg: usize) -> String {
    let out = dir.join("kang");
    cellfleet_ok(&[
        "ingest",
        data("kang_ifnb_pbmc.h5ad").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--hvg",
        &hvg.to_string(),
        "--label-col",
        "cell_type",
        "--label-col",
        "condition",
    ]);
    out.to_str().unwrap().to_string()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn f(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} missing in {v}"))
}

/// Cross-entropy of the per-gene marginal bin frequencies of the training cells (add-one smoothed) over
/// every gene position of the held-out cells: the expected masked-position cross-entropy of the
/// marginal predictor, computed here from the decoded corpus, independently of `cellfleet eval`.
fn marginal_cross_entropy(corpus_url: &str, split: CellSplit) -> f64 {
    let corpus = open_corpus(corpus_url);
    let n_bins = usize::from(corpus.manifest.bins.n_bins);
    let n_genes = corpus.manifest.genes.len();
    let cells = decode_all(&corpus);
    assert_eq!(cells.len() as u64, corpus.manifest.total_cells);
    // One source file: the global cell index is its row.
    let mut counts = vec![vec![1.0f64; n_bins]; n_genes];
    for ((_, row), (bins, _)) in &cells {
        if split.part_of(*row) == SplitPart::Train {
            for (g, &b) in bins.iter().enumerate() {
                counts[g][usize::from(b)] += 1.0;
            }
        }
    }
    let (mut nll, mut n) = (0.0, 0.0);
    for ((_, row), (bins, _)) in &cells {
        if split.part_of(*row) == SplitPart::Eval {
            for (g, &b) in bins.iter().enumerate() {
                let total: f64 = counts[g].iter().sum();
                nll -= (counts[g][usize::from(b)] / total).ln();
                n += 1.0;
            }
        }
    }
    nll / n
}

/// Pretraining learns beyond per-gene marginals, routes to every expert, writes weights PyTorch loads
/// to the same numbers; fine-tuning (full and LoRA) beats the majority class by a wide margin.
#[test]
fn pretrain_then_finetune_on_kang() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = ingest_kang(dir.path(), 256);
    let model_dir = dir.path().join("pretrained");
    let report_path = dir.path().join("pretrain.json");
    let stdout = cellfleet_ok(&[
        "train",
        "--corpus",
        &corpus,
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
        "2",
        "--out",
        model_dir.to_str().unwrap(),
        "--json",
        report_path.to_str().unwrap(),
    ]);
    println!("{stdout}");
    let report = read_json(&report_path);
    let model_ce = f(&report, &["masked_bins", "model_cross_entropy"]);
    let reported_marginal = f(&report, &["masked_bins", "marginal_cross_entropy"]);
    let marginal = marginal_cross_entropy(&corpus, CellSplit::default());
    println!("masked-bin cross-entropy: model {model_ce:.4}, marginal {marginal:.4} (all positions), {reported_marginal:.4} (masked positions)");
    assert!(
        (marginal - reported_marginal).abs() < 0.02,
        "the reported marginal baseline {reported_marginal} disagrees with the independent one {marginal}"
    );
    assert!(
        model_ce < 0.97 * marginal && model_ce < 0.95 * reported_marginal,
        "model {model_ce} is not clearly below the marginal predictor {marginal}"
    );
    let steps = report["steps"].as_array().unwrap();
    assert!(f(&steps[steps.len() - 1], &["loss"]) < 0.5 * f(&steps[0], &["loss"]));

    // Routing on real held-out cells reaches every expert of every layer.
    let saved = SavedModel::open(&model_dir).unwrap();
    let model = saved.load(saved.info.config.clone(), Device::Cpu).unwrap();
    let corpus_handle = std::sync::Arc::new(open_corpus(&corpus));
    let plan = std::sync::Arc::new(
        cellfleet_shared::stream::EpochPlan::for_part(
            &corpus_handle.manifest,
            cellfleet_shared::stream::OrderConfig::default(),
            0,
            saved.info.split,
            SplitPart::Eval,
        )
        .unwrap(),
    );
    let batch = cellfleet_shared::stream::batch::Loader::spawn(
        corpus_handle,
        plan,
        std::iter::once(0..64).collect(),
        cellfleet_shared::stream::batch::LoaderConfig::default(),
    )
    .unwrap()
    .next()
    .unwrap()
    .unwrap();
    let (tokens, _) = batch_tensors(&batch, Device::Cpu);
    let forward = tch::no_grad(|| model.forward(&tokens, Mode::EVAL));
    assert_eq!(forward.expert_load.len(), 2);
    for (layer, load) in forward.expert_load.iter().enumerate() {
        let load = Vec::<i64>::try_from(load).unwrap();
        let total: i64 = load.iter().sum();
        println!("layer {layer} expert load {load:?}");
        assert!(
            load.iter().all(|&c| c as f64 >= 0.02 * total as f64),
            "layer {layer} leaves an expert (almost) unused: {load:?}"
        );
    }

    // The weights load into plain PyTorch by name and give the same [CLS] states.
    let torch_side: Value =
        serde_json::from_str(&python("torch_forward.py", &[model_dir.to_str().unwrap()])).unwrap();
    assert_eq!(
        torch_side["parameters"].as_i64(),
        Some(model.parameter_count())
    );
    let (n_genes, n_bins) = (model.config.n_genes as i64, model.config.n_bins as i64);
    let bins: Vec<i64> = (0..3)
        .flat_map(|i| {
            (0..=n_genes).map(move |j| {
                if j == 0 {
                    n_bins + 1
                } else {
                    (7 * i + 3 * j) % n_bins
                }
            })
        })
        .collect();
    let fixed = Tokens {
        gene_ids: Tensor::arange(n_genes + 1, (Kind::Int64, Device::Cpu)).repeat([3, 1]),
        bins: Tensor::from_slice(&bins).view([3, n_genes + 1]),
        valid: None,
    };
    let ours = Vec::<f32>::try_from(model.embed(&fixed, Pooling::Cls).flatten(0, -1)).unwrap();
    let theirs: Vec<f64> = torch_side["cls"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    assert_eq!(ours.len(), theirs.len());
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-3,
        "PyTorch and cellfleet [CLS] states differ by {worst}"
    );

    // Full fine-tuning on cell_type.
    let tuned = dir.path().join("tuned");
    let tuned_report = dir.path().join("tuned.json");
    println!(
        "{}",
        cellfleet_ok(&[
            "finetune",
            "--corpus",
            &corpus,
            "--weights",
            model_dir.to_str().unwrap(),
            "--label-col",
            "cell_type",
            "--steps",
            "450",
            "--batch-size",
            "32",
            "--lr",
            "2e-3",
            "--threads",
            "2",
            "--out",
            tuned.to_str().unwrap(),
            "--json",
            tuned_report.to_str().unwrap(),
        ])
    );
    let eval = read_json(&tuned_report)["classification"].clone();
    let accuracy = f(&eval, &["model", "accuracy"]);
    let majority = f(&eval, &["majority_accuracy"]);
    let logreg = f(&eval, &["logistic_regression", "accuracy"]);
    println!("cell_type accuracy: model {accuracy:.3}, logistic regression {logreg:.3}, majority {majority:.3}");
    assert!(
        accuracy > majority + 0.25,
        "fine-tuned accuracy {accuracy} vs majority {majority}"
    );
    assert!(f(&eval, &["model", "cohen_kappa"]) > 0.5);
    assert!(
        logreg > majority,
        "the logistic-regression baseline did not fit"
    );

    // `eval` on the saved fine-tuned model reproduces the numbers fine-tuning reported.
    let eval_json = dir.path().join("eval.json");
    cellfleet_ok(&[
        "eval",
        "--corpus",
        &corpus,
        "--weights",
        tuned.to_str().unwrap(),
        "--json",
        eval_json.to_str().unwrap(),
    ]);
    let again = read_json(&eval_json)["classification"].clone();
    assert_eq!(again["model"], eval["model"]);

    // LoRA: only the adapters and the head move; the base weights in the file are the pretrained ones.
    let lora = dir.path().join("lora");
    let lora_report = dir.path().join("lora.json");
    cellfleet_ok(&[
        "finetune",
        "--corpus",
        &corpus,
        "--weights",
        model_dir.to_str().unwrap(),
        "--label-col",
        "cell_type",
        "--lora",
        "8",
        "--steps",
        "300",
        "--batch-size",
        "32",
        "--lr",
        "3e-3",
        "--threads",
        "2",
        "--out",
        lora.to_str().unwrap(),
        "--json",
        lora_report.to_str().unwrap(),
    ]);
    let lora_eval = read_json(&lora_report)["classification"].clone();
    let lora_accuracy = f(&lora_eval, &["model", "accuracy"]);
    println!("LoRA rank 8 accuracy {lora_accuracy:.3}");
    // A frozen tiny base whose [CLS] state was never trained limits LoRA (only attention adapts); it must
    // still clearly learn the task.
    assert!(
        lora_accuracy > majority + 0.08,
        "LoRA accuracy {lora_accuracy} vs majority {majority}"
    );
    let load = |p: &Path| -> BTreeMap<String, Tensor> {
        Tensor::read_safetensors(p.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect()
    };
    let (base, adapted) = (load(&model_dir), load(&lora));
    assert_eq!(
        adapted.keys().filter(|k| k.contains("lora_")).count(),
        2 * 4 * 2
    );
    for (name, tensor) in &base {
        assert!(
            adapted[name].equal(tensor),
            "LoRA fine-tuning changed {name}"
        );
    }

    // Class-weighted fine-tuning: weights proportional to 1/n_k over the training split, scaled so the
    // weighted count is the count (the loss keeps its scale), and the training takes another path than
    // the unweighted run from the same seed.
    let short = |weights: &str, name: &str| -> (String, Value) {
        let json = dir.path().join(format!("{name}.json"));
        let stdout = cellfleet_ok(&[
            "finetune",
            "--corpus",
            &corpus,
            "--weights",
            model_dir.to_str().unwrap(),
            "--label-col",
            "cell_type",
            "--class-weights",
            weights,
            "--steps",
            "20",
            "--batch-size",
            "32",
            "--threads",
            "2",
            "--out",
            dir.path().join(name).to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ]);
        (stdout, read_json(&json))
    };
    let (weighted_out, weighted) = short("inverse-frequency", "weighted");
    let (_, unweighted) = short("none", "unweighted");
    let line = weighted_out
        .lines()
        .find(|l| l.starts_with("class weights (inverse frequency):"))
        .unwrap_or_else(|| panic!("no class weights printed:\n{weighted_out}"));
    // "CD4T 0.441 (576 cells), B 1.289 (197 cells), ..."
    let classes: Vec<(f64, f64)> = line
        .split_once(':')
        .unwrap()
        .1
        .split("),")
        .map(|part| {
            let words: Vec<&str> = part.split_whitespace().collect();
            let weight: f64 = words[words.len() - 3].parse().unwrap();
            let cells: f64 = words[words.len() - 2]
                .trim_start_matches('(')
                .parse()
                .unwrap();
            (weight, cells)
        })
        .collect();
    assert_eq!(classes.len(), 7, "{line}");
    let total: f64 = classes.iter().map(|(_, n)| n).sum();
    let weighted_count: f64 = classes.iter().map(|(w, n)| w * n).sum();
    assert!(
        (weighted_count / total - 1.0).abs() < 0.01,
        "weighted count {weighted_count} vs {total} cells: {line}"
    );
    let per_class = total / classes.len() as f64;
    for (w, n) in &classes {
        assert!(
            (w * n / per_class - 1.0).abs() < 0.01,
            "w_k n_k is not constant: {line}"
        );
    }
    let losses = |v: &Value| -> Vec<f64> {
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["loss"].as_f64().unwrap())
            .collect()
    };
    assert_ne!(
        losses(&weighted)[1..],
        losses(&unweighted)[1..],
        "class weights changed nothing"
    );
}

fn loss_log(dir: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(dir.join("pretrain_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (f(&v, &["loss"]), f(&v, &["grad_norm"]))
        })
        .collect()
}

#[test]
fn same_seed_and_threads_give_identical_runs() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = ingest_kang(dir.path(), 64);
    let run = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        cellfleet_ok(&[
            "train",
            "--corpus",
            &corpus,
            "--local",
            "--preset",
            "tiny",
            "--steps",
            "8",
            "--batch-size",
            "16",
            "--seed",
            seed,
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    };
    let (a, b, c) = (run("a", "5"), run("b", "5"), run("c", "6"));
    assert_eq!(loss_log(&a).len(), 8);
    assert_eq!(loss_log(&a), loss_log(&b));
    assert_ne!(loss_log(&a), loss_log(&c));
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(weights(&a) == weights(&b), "same seed, different weights");
}

#[test]
fn bad_model_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = ingest_kang(dir.path(), 32);
    let model = dir.path().join("m");
    let m = model.to_str().unwrap();
    let common = ["--preset", "tiny", "--steps", "2", "--batch-size", "8"];
    let err =
        cellfleet_err(&[&["train", "--corpus", &corpus, "--out", m][..], &common[..]].concat());
    assert!(err.contains("--local"), "{err}");
    let err = cellfleet_err(
        &[
            &[
                "train", "--corpus", &corpus, "--local", "--device", "cuda:7", "--out", m,
            ][..],
            &common[..],
        ]
        .concat(),
    );
    assert!(
        err.contains("cuda:7") && err.contains("CUDA device"),
        "{err}"
    );
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "preset = \"tiny\"\nlearning_rate = 0.1\n").unwrap();
    let err = cellfleet_err(&[
        "train",
        "--corpus",
        &corpus,
        "--local",
        "--config",
        config.to_str().unwrap(),
        "--out",
        m,
    ]);
    assert!(
        err.contains("learning_rate") && err.contains("bad.toml"),
        "{err}"
    );
    let err = cellfleet_err(&[
        "finetune",
        "--corpus",
        &corpus,
        "--weights",
        m,
        "--label-col",
        "cell_type",
    ]);
    assert!(err.contains("no weights file"), "{err}");

    cellfleet_ok(
        &[
            &["train", "--corpus", &corpus, "--local", "--out", m][..],
            &common[..],
        ]
        .concat(),
    );
    let err = cellfleet_err(&[
        "finetune",
        "--corpus",
        &corpus,
        "--weights",
        m,
        "--label-col",
        "donor_id",
    ]);
    assert!(
        err.contains("donor_id") && err.contains("cell_type"),
        "{err}"
    );
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let other_corpus = ingest_kang(&other, 48);
    let err = cellfleet_err(&["eval", "--corpus", &other_corpus, "--weights", m]);
    assert!(
        err.contains("--genes") && err.contains("different gene vocabulary"),
        "{err}"
    );
    let err = cellfleet_err(&[
        "eval",
        "--corpus",
        &corpus,
        "--weights",
        m,
        "--device",
        "gpu",
    ]);
    assert!(err.contains("`gpu`"), "{err}");
}
