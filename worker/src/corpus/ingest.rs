//! `cellfleet ingest`: h5ad files in, a tokenized corpus (zstd shards + manifest) out.
//!
//! Two streaming passes over each input: pass 1 validates every value, detects counts vs log-normalized
//! input and accumulates HVG statistics (memory O(genes)); pass 2 bins cells and writes shards in
//! parallel. The manifest is written last.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cellfleet_shared::corpus::manifest::{
    LabelColumn, Manifest, ShardEntry, SourceFile, VocabularySource, FORMAT_VERSION, MANIFEST_FILE,
    MISSING_LABEL,
};
use cellfleet_shared::corpus::shard::{CellOrigin, ShardBuilder};
use cellfleet_shared::corpus::tokenize::{
    bin_key, BinRule, Binner, GeneUnion, HvgAccumulator, ValueKind,
};
use cellfleet_shared::storage::{S3Options, Store};
use indicatif::ProgressBar;

use crate::corpus::h5ad::{Column, CsrChunk, H5ad, InputError, Matrix};
use crate::corpus::shard_writer::write_shards;
use crate::progress;

/// Which matrix of each input to tokenize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerChoice {
    /// A counts layer when present, else X, falling back to raw/X when X holds negative (scaled) values.
    Auto,
    X,
    Raw,
    Layer(String),
}

impl std::str::FromStr for LayerChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => LayerChoice::Auto,
            "X" => LayerChoice::X,
            "raw" | "raw/X" => LayerChoice::Raw,
            other => LayerChoice::Layer(other.trim_start_matches("layers/").to_string()),
        })
    }
}

#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub inputs: Vec<PathBuf>,
    pub out: String,
    pub s3: S3Options,
    pub hvg: usize,
    pub bins: u16,
    pub layer: LayerChoice,
    pub genes_file: Option<PathBuf>,
    pub label_cols: Vec<String>,
    pub shard_cells: usize,
    pub block_cells: usize,
    pub threads: usize,
}

/// Rows read per HDF5 request in the streaming passes.
const READ_ROWS: usize = 4096;

/// What ingest reports when it is done.
#[derive(Debug)]
pub struct IngestReport {
    pub manifest: Manifest,
    pub notes: Vec<String>,
}

struct Source {
    h5: H5ad,
    matrix: Matrix,
    matrix_reason: String,
    /// File gene index -> union gene index.
    to_union: Vec<u32>,
    kind: ValueKind,
    obs_names: Vec<String>,
    /// Per label column, the unified code of every cell.
    labels: Vec<Vec<u32>>,
}

/// Size and blake3 of a file, read in 1 MiB pieces.
pub(crate) fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("{}: read failed", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hasher.finalize().to_hex().to_string()))
}

/// Result of the validating pass over one matrix.
enum Pass1 {
    Done {
        kind: ValueKind,
        stats: Option<HvgAccumulator>,
    },
    /// A negative value: the matrix holds scaled data.
    Negative { row: usize, gene: usize, value: f32 },
}

fn is_counts(chunk: &CsrChunk) -> bool {
    !chunk.values.is_empty() && chunk.values.iter().all(|v| v.fract() == 0.0)
}

/// Pass 1: validate values, detect the value kind, accumulate HVG statistics over union genes.
fn pass1(
    src_path: &Path,
    matrix: &Matrix,
    genes: &[String],
    to_union: &[u32],
    n_union: usize,
    want_stats: bool,
    progress: &ProgressBar,
) -> anyhow::Result<Pass1> {
    // HDF5 reads are serialized by the library, so one thread reads while this one validates and
    // accumulates; chunk buffers travel back to the reader to be reused.
    let (full_tx, full_rx) = crossbeam_channel::bounded::<Result<(usize, CsrChunk), String>>(2);
    let (empty_tx, empty_rx) = crossbeam_channel::bounded::<CsrChunk>(3);
    for _ in 0..3 {
        empty_tx
            .send(CsrChunk::default())
            .expect("room for three buffers");
    }
    // `move`: the channel ends owned here drop when validation stops early, which ends the reader.
    std::thread::scope(move |scope| {
        scope.spawn(move || {
            let mut start = 0;
            while start < matrix.n_obs {
                let end = (start + READ_ROWS).min(matrix.n_obs);
                let Ok(mut chunk) = empty_rx.recv() else {
                    return;
                };
                let read = matrix
                    .read_rows(start..end, &mut chunk)
                    .map(|()| (start, chunk));
                let failed = read.is_err();
                if full_tx.send(read).is_err() || failed {
                    return;
                }
                start = end;
            }
        });
        let mut kind = None;
        let mut stats: Option<HvgAccumulator> = None;
        let mut union_genes = Vec::new();
        for read in full_rx.iter() {
            let (start, chunk) = read.map_err(|e| InputError {
                file: src_path.into(),
                message: format!("{}: {e}", matrix.name),
            })?;
            if kind.is_none() {
                let k = if is_counts(&chunk) {
                    ValueKind::Counts
                } else {
                    ValueKind::LogNormalized
                };
                kind = Some(k);
                if want_stats {
                    stats = Some(HvgAccumulator::new(n_union, k));
                }
            }
            for row in 0..chunk.rows() {
                let (idx, vals) = chunk.row(row);
                let mut library = 0f64;
                let mut clean = true;
                for &v in vals {
                    clean &= v.is_finite() & (v >= 0.0);
                    library += f64::from(v);
                }
                if !clean {
                    let (&j, &v) = idx
                        .iter()
                        .zip(vals)
                        .find(|(_, v)| !v.is_finite() || **v < 0.0)
                        .expect("a bad value");
                    if !v.is_finite() {
                        bail!(InputError {
                            file: src_path.into(),
                            message: format!(
                                "{} holds {v} at cell {} gene {}; expression must be finite",
                                matrix.name,
                                start + row,
                                genes[j as usize]
                            ),
                        });
                    }
                    return Ok(Pass1::Negative {
                        row: start + row,
                        gene: j as usize,
                        value: v,
                    });
                }
                if let Some(stats) = stats.as_mut() {
                    union_genes.clear();
                    union_genes.extend(idx.iter().map(|&j| to_union[j as usize]));
                    stats.add_cell(&union_genes, vals, library);
                }
            }
            progress.inc(chunk.rows() as u64);
            let _ = empty_tx.send(chunk);
        }
        Ok(Pass1::Done {
            kind: kind.unwrap_or(ValueKind::Counts),
            stats,
        })
    })
}

fn counts_layer(h5: &H5ad) -> anyhow::Result<Option<String>> {
    let names = h5.matrix_names()?;
    Ok(names
        .iter()
        .find(|n| *n == "layers/counts")
        .or_else(|| {
            names
                .iter()
                .find(|n| n.starts_with("layers/") && n.to_lowercase().contains("count"))
        })
        .cloned())
}

fn read_genes_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the gene list", path.display()))?;
    let genes: Vec<String> = if path.extension().is_some_and(|e| e == "json") {
        // A corpus manifest or a model's model.json: both list the vocabulary under `genes`.
        #[derive(serde::Deserialize)]
        struct Vocabulary {
            genes: Vec<String>,
        }
        let vocabulary: Vocabulary = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: a .json --genes file must be a corpus manifest.json or a model.json (with a `genes` list)",
                path.display()
            )
        })?;
        vocabulary.genes
    } else {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()
    };
    if genes.is_empty() {
        bail!(
            "{}: the gene list is empty; expected one gene name per line",
            path.display()
        );
    }
    let mut seen = HashMap::new();
    for (i, g) in genes.iter().enumerate() {
        if let Some(first) = seen.insert(g.as_str(), i) {
            bail!(
                "{}: gene '{g}' is listed twice (lines {} and {})",
                path.display(),
                first + 1,
                i + 1
            );
        }
    }
    Ok(genes)
}

fn check_unique(path: &Path, what: &str, names: &[String]) -> anyhow::Result<()> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        if let Some(first) = seen.insert(n.as_str(), i) {
            bail!(InputError {
                file: path.into(),
                message: format!("duplicate gene name '{n}' in {what} (positions {first} and {i}); gene names must be unique (anndata: var_names_make_unique)"),
            });
        }
    }
    Ok(())
}

/// Ingests `opts.inputs` into a corpus at `opts.out`: checks the options, reads the label columns, picks
/// and validates each file's matrix while gathering HVG statistics (pass 1), chooses the vocabulary, bins
/// and writes the shards (pass 2), and writes the manifest last.
pub fn ingest(opts: &IngestOptions) -> anyhow::Result<IngestReport> {
    check_options(opts)?;
    let store = Store::open(&opts.out, &opts.s3)?;
    if store.exists(MANIFEST_FILE)? {
        bail!("{} already holds a corpus (it has a {MANIFEST_FILE}); choose another --out or remove it first", opts.out);
    }
    let mut notes = Vec::new();
    let started = std::time::Instant::now();

    // Open every input; the source hashes for the manifest are computed alongside the passes.
    let mut opened = Vec::new();
    for path in &opts.inputs {
        opened.push(H5ad::open(path)?);
    }
    let hashing: Vec<_> = opts
        .inputs
        .iter()
        .map(|path| {
            let path = path.clone();
            std::thread::spawn(move || hash_file(&path))
        })
        .collect();
    let fixed_genes = opts
        .genes_file
        .as_deref()
        .map(read_genes_file)
        .transpose()?;
    let (label_columns, labels_per_file) = unify_label_columns(&opened, &opts.label_cols)?;

    let mut scan = Scan {
        union: GeneUnion::default(),
        stats: None,
        want_stats: fixed_genes.is_none(),
        bar: progress::bar(0, "validating + HVG statistics"),
    };
    let mut sources = Vec::new();
    for (h5, labels) in opened.into_iter().zip(labels_per_file) {
        let source = choose_matrix(h5, labels, &opts.layer, &mut scan)?;
        notes.push(format!(
            "{}: using {} ({:?}) — {}",
            source.h5.path.display(),
            source.matrix.name,
            source.kind,
            source.matrix_reason
        ));
        sources.push(source);
    }
    scan.bar.finish_and_clear();
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        cells = scan.bar.position(),
        "validation and HVG statistics done"
    );

    let vocabulary = choose_vocabulary(opts, fixed_genes, &scan, &mut notes)?;
    let file_to_vocab: Vec<Vec<u32>> = sources
        .iter()
        .map(|s| {
            s.to_union
                .iter()
                .map(|&u| vocabulary.union_to_vocab[u as usize])
                .collect()
        })
        .collect();
    let entries = bin_and_write_shards(
        opts,
        &store,
        &sources,
        &file_to_vocab,
        vocabulary.genes.len(),
        label_columns.len(),
    )?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        shards = entries.len(),
        "shards written"
    );

    let hashes = hashing
        .into_iter()
        .map(|h| h.join().expect("hashing thread panicked"))
        .collect::<anyhow::Result<Vec<(u64, String)>>>()?;
    let n_vocab = vocabulary.genes.len();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        synthetic: false,
        genes: vocabulary.genes,
        vocabulary: vocabulary.source,
        bins: BinRule::per_cell_quantile(opts.bins),
        label_columns,
        block_cells: opts.block_cells as u32,
        shards: entries,
        sources: sources
            .iter()
            .zip(&file_to_vocab)
            .zip(hashes)
            .map(|((s, map), (bytes, blake3))| SourceFile {
                path: s.h5.path.display().to_string(),
                bytes,
                blake3,
                cells: s.matrix.n_obs as u64,
                genes: s.matrix.n_vars as u64,
                matrix: s.matrix.name.clone(),
                matrix_reason: s.matrix_reason.clone(),
                value_kind: s.kind,
                missing_vocabulary_genes: (n_vocab - map.iter().filter(|&&p| p != u32::MAX).count())
                    as u64,
            })
            .collect(),
        total_cells: sources.iter().map(|s| s.matrix.n_obs as u64).sum(),
        created_by: format!("cellfleet {}", env!("CARGO_PKG_VERSION")),
    };
    store.put(MANIFEST_FILE, serde_json::to_vec_pretty(&manifest)?.into())?;
    Ok(IngestReport { manifest, notes })
}

fn check_options(opts: &IngestOptions) -> anyhow::Result<()> {
    if opts.inputs.is_empty() {
        bail!("no input files; give one or more .h5ad files");
    }
    if !(2..=250).contains(&opts.bins) {
        bail!("--bins {} is out of range; expected 2..=250", opts.bins);
    }
    if opts.shard_cells == 0 || opts.block_cells == 0 {
        bail!("--shard-cells and --block-cells must be positive");
    }
    Ok(())
}

/// Reads the label columns (before any expensive pass) with categories unified across inputs: a
/// categorical column keeps its file's category order, text columns add values in order of first
/// appearance. Returns the columns and, per file and column, every cell's code.
#[allow(clippy::type_complexity)]
fn unify_label_columns(
    opened: &[H5ad],
    names: &[String],
) -> anyhow::Result<(Vec<LabelColumn>, Vec<Vec<Vec<u32>>>)> {
    let mut label_columns = Vec::new();
    let mut labels_per_file: Vec<Vec<Vec<u32>>> = vec![Vec::new(); opened.len()];
    for col in names {
        let mut categories: Vec<String> = Vec::new();
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut intern = |name: &str| -> u32 {
            if let Some(&code) = index.get(name) {
                return code;
            }
            categories.push(name.to_string());
            index.insert(name.to_string(), (categories.len() - 1) as u32);
            (categories.len() - 1) as u32
        };
        for (file, h5) in opened.iter().enumerate() {
            let column = h5.obs_column(col)?;
            if let Column::Categorical { categories, .. } = &column {
                for c in categories {
                    intern(c);
                }
            }
            let values = column.as_labels().map_err(|why| InputError {
                file: h5.path.clone(),
                message: format!("--label-col {col}: {why}"),
            })?;
            labels_per_file[file].push(
                values
                    .iter()
                    .map(|v| v.as_deref().map_or(MISSING_LABEL, &mut intern))
                    .collect(),
            );
        }
        label_columns.push(LabelColumn {
            name: col.clone(),
            categories,
        });
    }
    Ok((label_columns, labels_per_file))
}

/// What pass 1 accumulates over the inputs: the union of their genes, the merged HVG statistics, and the
/// progress bar over cells.
struct Scan {
    union: GeneUnion,
    stats: Option<HvgAccumulator>,
    want_stats: bool,
    bar: ProgressBar,
}

/// The matrices `layer` allows for `h5`, in order of preference, each with the reason it would be used.
fn matrix_candidates(h5: &H5ad, layer: &LayerChoice) -> anyhow::Result<Vec<(String, String)>> {
    Ok(match layer {
        LayerChoice::Auto => {
            let mut c = Vec::new();
            if let Some(layer) = counts_layer(h5)? {
                c.push((
                    layer.clone(),
                    format!("--layer auto: {layer} holds raw counts, the most faithful input"),
                ));
            }
            h5.matrix_path("X")?; // a file without X is malformed even if it has layers
            c.push((
                "X".into(),
                "--layer auto: X holds non-negative expression".into(),
            ));
            if h5.matrix_names()?.iter().any(|n| n == "raw") {
                c.push((
                    "raw".into(),
                    "--layer auto: X holds negative (scaled) values, so raw/X is used".into(),
                ));
            }
            c
        }
        LayerChoice::X => vec![("X".into(), "--layer X".into())],
        LayerChoice::Raw => vec![("raw".into(), "--layer raw".into())],
        LayerChoice::Layer(name) => vec![(name.clone(), format!("--layer {name}"))],
    })
}

/// Pass 1 over one file: tries its candidate matrices in order, validating each (a matrix with negative
/// values is rejected, and leaves nothing in the union or the bar), and returns the first that holds
/// unscaled expression, with its genes added to the union and its statistics merged.
fn choose_matrix(
    h5: H5ad,
    labels: Vec<Vec<u32>>,
    layer: &LayerChoice,
    scan: &mut Scan,
) -> anyhow::Result<Source> {
    let path = h5.path.clone();
    let mut chosen = None;
    let mut rejections = Vec::new();
    for (which, reason) in matrix_candidates(&h5, layer)? {
        let matrix = h5.matrix(&which)?;
        let genes = h5.var_names(which == "raw")?;
        if genes.len() != matrix.n_vars {
            bail!(InputError {
                file: path.clone(),
                message: format!(
                    "{} has {} genes but its var table names {}",
                    matrix.name,
                    matrix.n_vars,
                    genes.len()
                )
            });
        }
        if matrix.n_obs == 0 {
            bail!(InputError {
                file: path.clone(),
                message: format!("{} holds zero cells; nothing to ingest", matrix.name)
            });
        }
        check_unique(&path, &format!("the var names of {}", matrix.name), &genes)?;
        // A matrix rejected below must leave no genes behind in the union.
        let union_before = scan.union.clone();
        let to_union = scan.union.add(&genes);
        let before = scan.bar.position();
        scan.bar.inc_length(matrix.n_obs as u64);
        match pass1(
            &path,
            &matrix,
            &genes,
            &to_union,
            scan.union.len(),
            scan.want_stats,
            &scan.bar,
        )? {
            Pass1::Negative { row, gene, value } => {
                scan.union = union_before;
                scan.bar.set_position(before);
                scan.bar.set_length(before);
                let what = format!(
                    "{} holds a negative value ({value} at cell {row}, gene {})",
                    matrix.name, genes[gene]
                );
                let is_counts_layer =
                    which.starts_with("layers/") && which.to_lowercase().contains("count");
                if *layer != LayerChoice::Auto || is_counts_layer {
                    let hint = if is_counts_layer {
                        "a counts layer must hold non-negative counts"
                    } else {
                        "scaled data cannot be binned; use --layer raw or a counts layer"
                    };
                    bail!(InputError {
                        file: path.clone(),
                        message: format!("{what}; {hint}")
                    });
                }
                rejections.push(what);
            }
            Pass1::Done { kind, stats } => {
                let earlier_kind = scan.stats.as_ref().map(HvgAccumulator::kind);
                if let Some(stats) = stats {
                    match scan.stats.as_mut() {
                        Some(m) if m.kind() == stats.kind() => m.merge(&stats),
                        Some(_) => bail!(InputError {
                            file: path.clone(),
                            message: format!("{} holds {kind:?} values but earlier inputs hold {:?}; ingest one kind together (--layer)", matrix.name, earlier_kind),
                        }),
                        None => scan.stats = Some(stats),
                    }
                }
                chosen = Some((reason, matrix, to_union, kind));
                break;
            }
        }
    }
    let Some((reason, matrix, to_union, kind)) = chosen else {
        bail!(InputError {
            file: path.clone(),
            message: format!(
                "{}; no counts layer or raw/X holds unscaled expression to bin instead",
                rejections.join("; ")
            ),
        });
    };
    let reason = if rejections.is_empty() {
        reason
    } else {
        format!("{reason} ({})", rejections.join("; "))
    };
    tracing::info!(file = %path.display(), matrix = %matrix.name, kind = ?kind, "{reason}");
    let obs_names = h5.obs_names()?;
    if obs_names.len() != matrix.n_obs {
        bail!(InputError {
            file: path.clone(),
            message: format!(
                "obs names {} cells but {} has {} rows",
                obs_names.len(),
                matrix.name,
                matrix.n_obs
            )
        });
    }
    Ok(Source {
        h5,
        matrix,
        matrix_reason: reason,
        to_union,
        kind,
        obs_names,
        labels,
    })
}

/// The corpus vocabulary and how it was chosen.
struct Vocabulary {
    genes: Vec<String>,
    source: VocabularySource,
    /// Union gene index -> vocabulary position (`u32::MAX`: not in the vocabulary).
    union_to_vocab: Vec<u32>,
}

/// The vocabulary: the `--genes` file (genes absent from the input read as zero) or the `--hvg` most
/// variable genes of the union by the pass-1 statistics.
fn choose_vocabulary(
    opts: &IngestOptions,
    fixed_genes: Option<Vec<String>>,
    scan: &Scan,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vocabulary> {
    let union = &scan.union;
    let n_union = union.len();
    let (vocab_union, source): (Vec<Option<u32>>, VocabularySource) = match &fixed_genes {
        Some(genes) => {
            let missing = genes.iter().filter(|g| union.position(g).is_none()).count();
            if missing == genes.len() {
                let file = opts.genes_file.as_ref().unwrap().display();
                let sample: Vec<&str> = union.names.iter().take(3).map(String::as_str).collect();
                bail!("{file}: none of its {} genes occur in the input (input genes look like {sample:?}); is it the right vocabulary, with the same gene naming (symbols vs Ensembl ids)?", genes.len());
            }
            if missing > 0 {
                notes.push(format!(
                    "{missing} of {} vocabulary genes are absent from the input and read as zero",
                    genes.len()
                ));
            }
            let vocab = genes.iter().map(|g| union.position(g)).collect();
            (
                vocab,
                VocabularySource::Fixed {
                    file: opts.genes_file.as_ref().unwrap().display().to_string(),
                    missing_in_input: missing,
                },
            )
        }
        None => {
            let merged = scan
                .stats
                .as_ref()
                .expect("statistics are gathered for every input without --genes");
            let chosen = merged.select(opts.hvg);
            let vocab = chosen.iter().map(|&g| Some(g as u32)).collect();
            (
                vocab,
                VocabularySource::HighlyVariable {
                    requested: opts.hvg,
                    candidates: n_union,
                },
            )
        }
    };
    let genes: Vec<String> = match fixed_genes {
        Some(g) => g,
        None => vocab_union
            .iter()
            .map(|u| union.names[u.unwrap() as usize].clone())
            .collect(),
    };
    if genes.len() > usize::from(u16::MAX) - 1 {
        bail!(
            "the vocabulary has {} genes; at most {} fit a token id",
            genes.len(),
            u16::MAX - 1
        );
    }
    let mut union_to_vocab = vec![u32::MAX; n_union];
    for (pos, u) in vocab_union.iter().enumerate() {
        if let Some(u) = u {
            union_to_vocab[*u as usize] = pos as u32;
        }
    }
    Ok(Vocabulary {
        genes,
        source,
        union_to_vocab,
    })
}

/// Pass 2: reads every file again in shard-sized row ranges, bins each cell's vocabulary genes, and writes
/// the shards on `opts.threads` threads; returns their manifest entries.
fn bin_and_write_shards(
    opts: &IngestOptions,
    store: &Store,
    sources: &[Source],
    file_to_vocab: &[Vec<u32>],
    n_vocab: usize,
    n_labels: usize,
) -> anyhow::Result<Vec<ShardEntry>> {
    let total_cells: u64 = sources.iter().map(|s| s.matrix.n_obs as u64).sum();
    let bar = progress::bar(total_cells, "binning + writing shards");
    struct Job {
        source: usize,
        first_row: usize,
        chunk: CsrChunk,
    }
    // Chunk buffers come back from the binning threads to be refilled: no fresh allocation per shard.
    let (recycle_tx, recycle_rx) = crossbeam_channel::unbounded::<CsrChunk>();
    let recycle_rx = &recycle_rx;
    let jobs = sources.iter().enumerate().flat_map(|(si, src)| {
        let n = src.matrix.n_obs;
        (0..n).step_by(opts.shard_cells).map(move |start| {
            let end = (start + opts.shard_cells).min(n);
            let mut chunk = recycle_rx.try_recv().unwrap_or_default();
            src.matrix.read_rows(start..end, &mut chunk).map_err(|e| {
                anyhow::Error::new(InputError {
                    file: src.h5.path.clone(),
                    message: format!("{}: {e}", src.matrix.name),
                })
            })?;
            Ok(Job {
                source: si,
                first_row: start,
                chunk,
            })
        })
    });
    let bins = opts.bins;
    let entries = write_shards(
        store,
        jobs,
        opts.threads,
        opts.block_cells,
        &bar,
        |job: Job| {
            let src = &sources[job.source];
            let map = &file_to_vocab[job.source];
            let mut builder = ShardBuilder::new(n_vocab, n_labels);
            let mut keys: Vec<u64> = Vec::new();
            let mut nonzero: Vec<(u16, u8)> = Vec::new();
            let mut binner = Binner::default();
            let mut labels = vec![0u32; n_labels];
            for r in 0..job.chunk.rows() {
                let row = job.first_row + r;
                for (l, codes) in src.labels.iter().enumerate() {
                    labels[l] = codes[row];
                }
                let origin = CellOrigin {
                    source: job.source as u32,
                    row: row as u64,
                    name: src.obs_names[row].clone(),
                };
                let (idx, vals) = job.chunk.row(r);
                keys.clear();
                keys.extend(idx.iter().zip(vals).filter_map(|(&j, &v)| {
                    let pos = map[j as usize];
                    (pos != u32::MAX && v != 0.0).then(|| bin_key(v, pos))
                }));
                nonzero.clear();
                binner.bin(&mut keys, bins, |pos, bin| nonzero.push((pos as u16, bin)));
                builder.push_sparse(origin, &labels, nonzero.iter().copied());
            }
            let _ = recycle_tx.send(job.chunk);
            Ok(builder)
        },
    )?;
    bar.finish_and_clear();
    Ok(entries)
}
