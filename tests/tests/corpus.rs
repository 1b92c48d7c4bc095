//! End-to-end tests of the corpus: the real `cellfleet` binary on the real datasets, checked against an
//! independent Python (anndata + numpy) reference.

use std::path::Path;

use std::process::Output;

use cellfleet_e2e::{data, decode_all, open_corpus, python};
use cellfleet_shared::corpus::manifest::{Manifest, MANIFEST_FILE, MISSING_LABEL};

/// The `cellfleet` binary cargo built for these tests.
fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cellfleet"))
}

fn cellfleet(args: &[&str]) -> Output {
    cellfleet_e2e::cellfleet(bin(), args)
}

fn cellfleet_ok(args: &[&str]) -> String {
    cellfleet_e2e::cellfleet_ok(bin(), args)
}

/// Writes the h5ad variants and bad inputs derived from the real files (tests/py/make_inputs.py).
fn make_inputs(dir: &Path) {
    let data = cellfleet_e2e::data_dir();
    python(
        "make_inputs.py",
        &[data.to_str().unwrap(), dir.to_str().unwrap()],
    );
}

struct RealFile {
    name: &'static str,
    labels: &'static [&'static str],
    expected_matrix: &'static str,
}

const REAL_FILES: &[RealFile] = &[
    RealFile {
        name: "kang_ifnb_pbmc.h5ad",
        labels: &["condition", "cell_type"],
        expected_matrix: "X",
    },
    // X is scaled (negative values): auto must switch to the raw matrix.
    RealFile {
        name: "pbmc68k_reduced.h5ad",
        labels: &["bulk_labels", "phase"],
        expected_matrix: "raw.X",
    },
    // Modern encoding with a counts layer.
    RealFile {
        name: "norman_subset.h5ad",
        labels: &["condition", "cell_type"],
        expected_matrix: "layers/counts",
    },
    // Dense raw counts, LZF-compressed.
    RealFile {
        name: "pbmc5k_citeseq_counts.h5ad",
        labels: &[],
        expected_matrix: "X",
    },
];

fn read_manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).expect("manifest written"))
        .expect("manifest parses")
}

/// Compares every sampled cell's decoded bins and labels with the reference computed from the h5ad.
fn assert_matches_reference(h5ad: &Path, corpus_dir: &Path, rows: &[u64]) {
    assert_source_matches_reference(0, h5ad, corpus_dir, rows);
}

/// [`assert_matches_reference`] for input number `source` of a multi-file ingest.
fn assert_source_matches_reference(source: u32, h5ad: &Path, corpus_dir: &Path, rows: &[u64]) {
    let corpus = open_corpus(corpus_dir.to_str().unwrap());
    let manifest = &corpus.manifest;
    let cells = decode_all(&corpus);
    assert_eq!(
        cells.len() as u64,
        manifest.total_cells,
        "every cell decodes once"
    );
    let genes_json = corpus_dir.join("genes.json");
    std::fs::write(&genes_json, serde_json::to_vec(&manifest.genes).unwrap()).unwrap();
    let rows_json = serde_json::to_string(rows).unwrap();
    let n_bins = manifest.bins.n_bins.to_string();
    let mut args = vec![
        h5ad.to_str().unwrap(),
        manifest.sources[source as usize].matrix.as_str(),
        genes_json.to_str().unwrap(),
        n_bins.as_str(),
        rows_json.as_str(),
    ];
    let label_names: Vec<&str> = manifest
        .label_columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    args.extend(&label_names);
    let reference: serde_json::Value =
        serde_json::from_str(&python("reference.py", &args)).expect("reference JSON");
    for (i, &row) in rows.iter().enumerate() {
        let (bins, labels) = &cells[&(source, row)];
        let expected: Vec<u8> = reference["bins"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            bins,
            &expected,
            "{}: cell {row} bins differ from the reference",
            h5ad.display()
        );
        for (c, column) in manifest.label_columns.iter().enumerate() {
            let want = reference["labels"][&column.name][i].as_str();
            let got = (labels[c] != MISSING_LABEL)
                .then(|| column.categories[labels[c] as usize].as_str());
            assert_eq!(
                got,
                want,
                "{}: cell {row} label {}",
                h5ad.display(),
                column.name
            );
        }
    }
}

fn sample_rows(n: u64, wanted: u64) -> Vec<u64> {
    let step = (n / wanted).max(1);
    let mut rows: Vec<u64> = (0..n).step_by(step as usize).collect();
    rows.push(n - 1);
    rows.dedup();
    rows
}

#[test]
fn every_real_file_ingests_with_auto_and_matches_the_reference_binning() {
    let tmp = tempfile::tempdir().unwrap();
    for file in REAL_FILES {
        let out = tmp.path().join(file.name);
        let input = data(file.name);
        let mut args = vec![
            "ingest",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--shard-cells",
            "300",
        ];
        for l in file.labels {
            args.extend(["--label-col", l]);
        }
        cellfleet_ok(&args);
        let manifest = read_manifest(&out);
        assert_eq!(
            manifest.sources[0].matrix, file.expected_matrix,
            "{}: auto picked the wrong matrix",
            file.name
        );
        assert!(!manifest.synthetic);
        assert!(manifest.genes.len() <= 4096);
        assert_matches_reference(&input, &out, &sample_rows(manifest.total_cells, 60));
        let verify = cellfleet_ok(&["corpus", "verify", out.to_str().unwrap()]);
        assert!(verify.starts_with("ok:"), "{verify}");
    }
}

#[test]
fn csc_and_dense_gzip_layouts_give_the_same_corpus_through_a_fixed_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let variants = tmp.path().join("variants");
    make_inputs(&variants);
    let base = tmp.path().join("base");
    cellfleet_ok(&[
        "ingest",
        data("kang_ifnb_pbmc.h5ad").to_str().unwrap(),
        "--out",
        base.to_str().unwrap(),
        "--hvg",
        "2000",
    ]);
    let base_cells = decode_all(&open_corpus(base.to_str().unwrap()));
    let vocabulary = base.join(MANIFEST_FILE);
    for variant in ["kang_csc.h5ad", "kang_dense_gzip.h5ad"] {
        let out = tmp.path().join(variant);
        let input = variants.join(variant);
        cellfleet_ok(&[
            "ingest",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--genes",
            vocabulary.to_str().unwrap(),
        ]);
        let manifest = read_manifest(&out);
        assert_eq!(
            manifest.genes,
            read_manifest(&base).genes,
            "{variant}: the fixed vocabulary is kept"
        );
        let cells = decode_all(&open_corpus(out.to_str().unwrap()));
        assert_eq!(
            cells, base_cells,
            "{variant}: bins differ from the CSR original"
        );
    }
    // A text gene list with genes absent from the input: they read as zero and are counted.
    let list = tmp.path().join("genes.txt");
    std::fs::write(&list, "ISG15\nIFI6\nNOT_A_GENE\nIFIT1\n").unwrap();
    let out = tmp.path().join("list");
    cellfleet_ok(&[
        "ingest",
        data("kang_ifnb_pbmc.h5ad").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--genes",
        list.to_str().unwrap(),
    ]);
    let manifest = read_manifest(&out);
    assert_eq!(manifest.genes, ["ISG15", "IFI6", "NOT_A_GENE", "IFIT1"]);
    assert_eq!(manifest.sources[0].missing_vocabulary_genes, 1);
    let cells = decode_all(&open_corpus(out.to_str().unwrap()));
    assert!(
        cells.values().all(|(bins, _)| bins[2] == 0),
        "a missing gene is zero everywhere"
    );
    assert!(
        cells.values().any(|(bins, _)| bins[0] > 0),
        "ISG15 is expressed in Kang"
    );
}

#[test]
fn bad_inputs_fail_with_one_clear_message_and_leave_no_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("inputs");
    make_inputs(&inputs);
    let kang = data("kang_ifnb_pbmc.h5ad");
    let unknown = inputs.join("unknown_genes.txt");
    let bad_files = [
        ("not_hdf5.h5ad", "not an HDF5 file"),
        ("truncated.h5ad", "truncated"),
        ("missing_x.h5ad", "has no X matrix"),
        ("nan.h5ad", "holds NaN at cell 3"),
        ("inf.h5ad", "holds inf at cell 3"),
        (
            "negative_counts.h5ad",
            "counts layer must hold non-negative",
        ),
        ("duplicate_genes.h5ad", "duplicate gene name"),
        ("zero_cells.h5ad", "zero cells"),
    ];
    let mut cases: Vec<(Vec<String>, &str, &str)> = bad_files
        .iter()
        .map(|&(file, says)| (vec![inputs.join(file).display().to_string()], file, says))
        .collect();
    cases.push((
        vec![
            kang.display().to_string(),
            "--genes".into(),
            unknown.display().to_string(),
        ],
        "unknown_genes.txt",
        "none of its 2 genes occur in the input",
    ));
    cases.push((
        vec![
            kang.display().to_string(),
            "--label-col".into(),
            "no_such_column".into(),
        ],
        "kang_ifnb_pbmc.h5ad",
        "has no obs column 'no_such_column'",
    ));
    for (i, (args, names, says)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("out-{i}"));
        let mut full: Vec<&str> = vec!["ingest"];
        full.extend(args.iter().map(String::as_str));
        full.extend(["--out", out.to_str().unwrap()]);
        let result = cellfleet(&full);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{names}: ingest should fail");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(
            errors.len(),
            1,
            "{names}: expected one error line, got:\n{stderr}"
        );
        assert!(
            errors[0].contains(names) && errors[0].contains(says),
            "{names}: message should name the file and say '{says}':\n{stderr}"
        );
        assert!(
            !out.join(MANIFEST_FILE).exists(),
            "{names}: a failed ingest must leave no manifest"
        );
    }
}

#[test]
fn an_existing_corpus_is_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("c");
    let input = data("norman_subset.h5ad");
    cellfleet_ok(&[
        "ingest",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let before = std::fs::read(out.join(MANIFEST_FILE)).unwrap();
    let second = cellfleet(&[
        "ingest",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--bins",
        "10",
    ]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already holds a corpus"));
    assert_eq!(std::fs::read(out.join(MANIFEST_FILE)).unwrap(), before);
}

#[test]
fn verify_names_a_corrupted_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("c");
    cellfleet_ok(&[
        "ingest",
        data("kang_ifnb_pbmc.h5ad").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shard-cells",
        "500",
    ]);
    let shard = out.join("shards/shard-000002.cfs");
    let mut bytes = std::fs::read(&shard).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let result = cellfleet(&["corpus", "verify", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(
        stderr.contains("shard-000002.cfs") && stderr.contains("hash"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("shard-000001.cfs"),
        "only the damaged shard is reported: {stderr}"
    );
}

#[test]
fn the_stream_is_identical_across_processes_and_changes_with_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("c");
    let url = out.to_str().unwrap();
    cellfleet_ok(&[
        "ingest",
        data("kang_ifnb_pbmc.h5ad").to_str().unwrap(),
        "--out",
        url,
        "--shard-cells",
        "400",
        "--label-col",
        "cell_type",
    ]);
    let stream = |seed: &str, world: &str, rank: &str| {
        cellfleet_ok(&[
            "corpus",
            "stream",
            url,
            "--seed",
            seed,
            "--world",
            world,
            "--rank",
            rank,
            "--batch-size",
            "16",
            "--batches",
            "6",
            "--cursor",
            "5000",
        ])
    };
    let a = stream("11", "1", "0");
    let b = stream("11", "1", "0");
    assert_eq!(
        a, b,
        "two processes must produce the same order, permutations and masks"
    );
    assert_ne!(
        a,
        stream("12", "1", "0"),
        "another seed gives another order"
    );
    // Two ranks of world 2 with batch 8 read exactly the samples world 1 reads with batch 16.
    let ids = |text: &str| -> Vec<String> {
        let mut v: Vec<String> = text
            .lines()
            .skip(1)
            .flat_map(|l| {
                l.split("samples(cell.clone) ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort();
        v
    };
    let ranks = cellfleet_ok(&[
        "corpus",
        "stream",
        url,
        "--seed",
        "11",
        "--world",
        "2",
        "--rank",
        "0",
        "--batch-size",
        "8",
        "--batches",
        "6",
        "--cursor",
        "5000",
    ]) + &cellfleet_ok(&[
        "corpus",
        "stream",
        url,
        "--seed",
        "11",
        "--world",
        "2",
        "--rank",
        "1",
        "--batch-size",
        "8",
        "--batches",
        "6",
        "--cursor",
        "5000",
    ])
    .lines()
    .skip(1)
    .map(|l| format!("{l}\n"))
    .collect::<String>();
    assert_eq!(ids(&ranks), ids(&a));
}

#[test]
fn synth_builds_a_marked_synthetic_corpus_and_a_readable_h5ad() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("synth");
    let kang = data("kang_ifnb_pbmc.h5ad");
    cellfleet_ok(&[
        "synth",
        "--cells",
        "3000",
        "--from",
        kang.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--label-col",
        "cell_type",
        "--hvg",
        "1000",
    ]);
    let manifest = read_manifest(&out);
    assert!(manifest.synthetic);
    assert_eq!(manifest.total_cells, 3000);
    assert_eq!(manifest.genes.len(), 1000);
    assert!(cellfleet_ok(&["corpus", "inspect", out.to_str().unwrap()]).contains("SYNTHETIC"));
    let cells = decode_all(&open_corpus(out.to_str().unwrap()));
    let expressed = cells
        .values()
        .filter(|(bins, _)| bins.iter().any(|&b| b > 0))
        .count();
    assert!(
        expressed > 2900,
        "synthetic cells carry expression ({expressed} of 3000)"
    );

    let h5ad = tmp.path().join("synth.h5ad");
    cellfleet_ok(&[
        "synth",
        "--cells",
        "2500",
        "--from",
        kang.to_str().unwrap(),
        "--out",
        h5ad.to_str().unwrap(),
        "--label-col",
        "condition",
    ]);
    let corpus = tmp.path().join("from-h5ad");
    cellfleet_ok(&[
        "ingest",
        h5ad.to_str().unwrap(),
        "--out",
        corpus.to_str().unwrap(),
        "--label-col",
        "condition",
    ]);
    let manifest = read_manifest(&corpus);
    assert_eq!(manifest.total_cells, 2500);
    assert_eq!(manifest.sources[0].matrix, "X");
    // anndata reads the file and the reference binning agrees with ingest.
    assert_matches_reference(&h5ad, &corpus, &sample_rows(2500, 25));
}

#[test]
fn ingest_writes_to_and_reads_from_a_real_s3_server() {
    let garage = cellfleet_e2e::GarageServer::start(bin());
    let kang = data("kang_ifnb_pbmc.h5ad");
    let url = garage.url("corpora/kang");
    let ok = |args: &[&str]| {
        let out = garage.cellfleet(args);
        assert!(
            out.status.success(),
            "cellfleet {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    ok(&[
        "ingest",
        kang.to_str().unwrap(),
        "--out",
        &url,
        "--label-col",
        "condition",
        "--shard-cells",
        "700",
    ]);
    assert!(ok(&["corpus", "verify", &url]).starts_with("ok: 3 shards"));
    // The same input written locally gives byte-identical shards (same hashes in both manifests).
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("kang");
    cellfleet_ok(&[
        "ingest",
        kang.to_str().unwrap(),
        "--out",
        local.to_str().unwrap(),
        "--label-col",
        "condition",
        "--shard-cells",
        "700",
    ]);
    let inspect = ok(&["corpus", "inspect", &url]);
    assert!(
        inspect.contains(&read_manifest(&local).content_hash()),
        "same manifest hash on S3 and locally:\n{inspect}"
    );
    let stream_args = ["--seed", "3", "--batch-size", "8", "--batches", "3"];
    let remote = ok(&[&["corpus", "stream", url.as_str()][..], &stream_args].concat());
    let here = cellfleet_ok(
        &[
            &["corpus", "stream", local.to_str().unwrap()][..],
            &stream_args,
        ]
        .concat(),
    );
    assert_eq!(
        remote.lines().skip(1).collect::<Vec<_>>(),
        here.lines().skip(1).collect::<Vec<_>>()
    );
    // A second ingest to the same prefix is refused and leaves the corpus as it was.
    let again = garage.cellfleet(&["ingest", kang.to_str().unwrap(), "--out", &url]);
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("already holds a corpus")
    );
}

#[test]
fn several_inputs_share_one_vocabulary_and_keep_their_own_matrices() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("two");
    let (kang, pbmc) = (data("kang_ifnb_pbmc.h5ad"), data("pbmc68k_reduced.h5ad"));
    cellfleet_ok(&[
        "ingest",
        kang.to_str().unwrap(),
        pbmc.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--hvg",
        "3000",
    ]);
    let manifest = read_manifest(&out);
    assert_eq!(manifest.total_cells, 1975 + 700);
    assert_eq!(manifest.genes.len(), 3000);
    assert_eq!(manifest.sources[0].matrix, "X");
    assert_eq!(
        manifest.sources[1].matrix, "raw.X",
        "pbmc68k's scaled X is still replaced by raw"
    );
    // Each file lacks some vocabulary genes (they read as zero) and the counts are reported per file.
    assert!(manifest
        .sources
        .iter()
        .all(|s| s.missing_vocabulary_genes > 0 && s.missing_vocabulary_genes < 3000));
    assert_source_matches_reference(0, &kang, &out, &sample_rows(1975, 20));
    assert_source_matches_reference(1, &pbmc, &out, &sample_rows(700, 20));
}
