//! Harness for the end-to-end tests: locate (and build) the real `cellfleet` binary, the real datasets
//! and the Python reference scripts. Missing parts fail the test loudly; nothing is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::store::S3Options;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// `../shared/data` beside the checkout; panics with a clear message when it is absent.
pub fn data_dir() -> PathBuf {
    let dir = std::env::var_os("CELLFLEET_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data"));
    assert!(
        dir.join("kang_ifnb_pbmc.h5ad").is_file(),
        "the real datasets are missing: expected {}/kang_ifnb_pbmc.h5ad (set CELLFLEET_DATA to their folder)",
        dir.display()
    );
    dir
}

pub fn data(name: &str) -> PathBuf {
    data_dir().join(name)
}

/// Path of the `cellfleet` binary of the same profile as this test, built once per test process.
pub fn cellfleet_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps layout")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut build = Command::new(env!("CARGO"));
        build
            .args([
                "build",
                "-q",
                "-p",
                "cellfleet-worker",
                "--bin",
                "cellfleet",
            ])
            .current_dir(workspace_root());
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building the cellfleet binary failed");
        let bin = profile_dir.join("cellfleet");
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
}

/// Runs `cellfleet ARGS` and returns its output (no assertion on the exit status).
pub fn cellfleet(args: &[&str]) -> Output {
    Command::new(cellfleet_bin())
        .args(args)
        .env("CELLFLEET_QUIET", "1")
        .output()
        .expect("cellfleet starts")
}

/// Runs `cellfleet ARGS`, panicking with its stderr when it fails; returns stdout.
pub fn cellfleet_ok(args: &[&str]) -> String {
    let out = cellfleet(args);
    assert!(
        out.status.success(),
        "cellfleet {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs a Python script from tests/py; panics (never skips) when Python or its packages are missing.
pub fn python(script: &str, args: &[&str]) -> String {
    let path = workspace_root().join("tests/py").join(script);
    let out = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(&path)
        .args(args)
        .output()
        .expect(
            "python3 must be installed (scripts/setup.sh installs it with anndata, h5py, numpy)",
        );
    assert!(
        out.status.success(),
        "python {script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

pub fn open_corpus(url: &str) -> Corpus {
    Corpus::open(url, &S3Options::default()).expect("corpus opens")
}

/// Every cell of a corpus as (source, row) -> (bins, labels), decoded through the shared library.
pub fn decode_all(corpus: &Corpus) -> std::collections::HashMap<(u32, u64), (Vec<u8>, Vec<u32>)> {
    let mut cells = std::collections::HashMap::new();
    for i in 0..corpus.manifest.shards.len() {
        let shard = corpus.fetch_shard(i).expect("shard verifies");
        let origins = shard.origins().expect("origins decode");
        let mut at = 0;
        for b in 0..shard.n_blocks() {
            let block = shard.read_block(b).expect("block decodes");
            for c in 0..block.cells {
                let o = &origins[at];
                cells.insert(
                    (o.source, o.row),
                    (block.bins_of(c).to_vec(), block.labels_of(c).to_vec()),
                );
                at += 1;
            }
        }
    }
    cells
}
