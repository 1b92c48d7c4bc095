//! `cellfleet synth`: a SYNTHETIC corpus of any size, resampled from real cells, for scale tests and
//! benchmarks only (there is no real 590k-cell corpus on a development machine).
//!
//! Synthetic cell i: a real cell r is drawn uniformly (Philox, domain `Synth`, counter a = i); its
//! expression becomes proportions p_g (counts / total, or expm1(log-normalized) / total); a library size
//! L = L_r * exp(0.3 z) is drawn around the real cell's depth (L_r = its total counts, or 10 x its detected
//! genes for log-normalized sources, which carry no depth); then counts_g ~ Poisson(L p_g) for every gene
//! the real cell expresses (exact inversion for small means, the normal approximation above 30).
//! The vocabulary is the HVG selection over the real cells. The manifest is marked `synthetic: true`.
//! With an `.h5ad` output path, the counts are written as a modern-encoding AnnData file instead, which is
//! what the ingest benchmark reads.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use cellfleet_shared::corpus::manifest::{
    LabelColumn, Manifest, SourceFile, VocabularySource, FORMAT_VERSION, MANIFEST_FILE,
    MISSING_LABEL,
};
use cellfleet_shared::corpus::shard::{CellOrigin, ShardBuilder};
use cellfleet_shared::corpus::tokenize::{
    bin_key, BinRule, Binner, GeneUnion, HvgAccumulator, ValueKind,
};
use cellfleet_shared::philox::{Domain, PhiloxStream};
use cellfleet_shared::storage::{S3Options, Store};

use crate::corpus::h5ad::{CsrChunk, H5ad};
use crate::corpus::ingest::hash_file;
use crate::corpus::shard_writer::write_shards;
use crate::progress;

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub cells: u64,
    pub sources: Vec<PathBuf>,
    pub out: String,
    pub s3: S3Options,
    pub hvg: usize,
    pub bins: u16,
    pub label_cols: Vec<String>,
    pub seed: u64,
    pub shard_cells: usize,
    pub block_cells: usize,
    pub threads: usize,
}

/// Real cells in memory, over the union of the sources' genes.
struct Profiles {
    genes: Vec<String>,
    /// Per real cell: (union gene, proportion) pairs and its library size.
    cells: Vec<(Vec<(u32, f64)>, f64)>,
    labels: Vec<Vec<u32>>,
    label_columns: Vec<LabelColumn>,
    sources: Vec<SourceFile>,
    hvg: HvgAccumulator,
}

fn load_profiles(opts: &SynthOptions) -> anyhow::Result<Profiles> {
    let mut union = GeneUnion::default();
    let mut cells = Vec::new();
    let mut label_columns: Vec<LabelColumn> = opts
        .label_cols
        .iter()
        .map(|c| LabelColumn {
            name: c.clone(),
            categories: Vec::new(),
        })
        .collect();
    let mut labels: Vec<Vec<u32>> = vec![Vec::new(); opts.label_cols.len()];
    let mut sources = Vec::new();
    let mut per_file_stats = Vec::new();
    for path in &opts.sources {
        let h5 = H5ad::open(path)?;
        // Same preference as `ingest --layer auto`: a counts layer, else X, else raw when X is scaled.
        let mut candidates: Vec<String> = h5
            .matrix_names()?
            .into_iter()
            .filter(|n| n.starts_with("layers/") && n.contains("count"))
            .collect();
        candidates.extend(["X".to_string(), "raw".to_string()]);
        let mut loaded = None;
        for which in candidates {
            let Ok(matrix) = h5.matrix(&which) else {
                continue;
            };
            let mut chunk = CsrChunk::default();
            matrix
                .read_rows(0..matrix.n_obs, &mut chunk)
                .map_err(|e| anyhow::anyhow!("{}: {}: {e}", path.display(), matrix.name))?;
            if chunk.values.iter().all(|v| v.is_finite() && *v >= 0.0) {
                loaded = Some((which, matrix, chunk));
                break;
            }
        }
        let Some((which, matrix, chunk)) = loaded else {
            bail!(
                "{}: no matrix with finite, non-negative expression to resample",
                path.display()
            );
        };
        let file_genes = h5.var_names(which == "raw")?;
        let to_union = union.add(&file_genes);
        let kind = if chunk.values.iter().all(|v| v.fract() == 0.0) {
            ValueKind::Counts
        } else {
            ValueKind::LogNormalized
        };
        let mut stats = HvgAccumulator::new(union.len(), kind);
        let mut union_idx = Vec::new();
        for r in 0..chunk.rows() {
            let (idx, vals) = chunk.row(r);
            let linear: Vec<f64> = match kind {
                ValueKind::Counts => vals.iter().map(|&v| f64::from(v)).collect(),
                ValueKind::LogNormalized => vals.iter().map(|&v| f64::from(v).exp_m1()).collect(),
            };
            let total: f64 = linear.iter().sum();
            if total <= 0.0 {
                continue;
            }
            let library = match kind {
                ValueKind::Counts => total,
                ValueKind::LogNormalized => 10.0 * idx.len() as f64,
            };
            cells.push((
                idx.iter()
                    .zip(&linear)
                    .map(|(&j, &x)| (to_union[j as usize], x / total))
                    .collect(),
                library,
            ));
            union_idx.clear();
            union_idx.extend(idx.iter().map(|&j| to_union[j as usize]));
            stats.add_cell(&union_idx, vals, total);
        }
        per_file_stats.push(stats);
        for (c, col) in opts.label_cols.iter().enumerate() {
            let values = h5
                .obs_column(col)?
                .as_labels()
                .map_err(|why| anyhow::anyhow!("{}: --label-col {col}: {why}", path.display()))?;
            let cats = &mut label_columns[c].categories;
            for (r, v) in values.iter().enumerate() {
                // Keep the labels of the rows that became profiles (rows with expression).
                let (idx, _) = chunk.row(r);
                if idx.is_empty() {
                    continue;
                }
                let code = match v {
                    None => MISSING_LABEL,
                    Some(name) => match cats.iter().position(|c| c == name) {
                        Some(p) => p as u32,
                        None => {
                            cats.push(name.clone());
                            (cats.len() - 1) as u32
                        }
                    },
                };
                labels[c].push(code);
            }
        }
        let (bytes, hash) = hash_file(path)?;
        sources.push(SourceFile {
            path: path.display().to_string(),
            bytes,
            blake3: hash,
            cells: matrix.n_obs as u64,
            genes: matrix.n_vars as u64,
            matrix: matrix.name.clone(),
            matrix_reason:
                "synth resamples the first matrix with non-negative values (counts layer, X, raw)"
                    .into(),
            value_kind: kind,
            missing_vocabulary_genes: 0,
        });
    }
    if cells.is_empty() {
        bail!("the --from files hold no cells with expression");
    }
    let mut hvg = per_file_stats.remove(0);
    for s in &per_file_stats {
        if s.kind() != hvg.kind() {
            bail!("--from files mix raw counts and log-normalized values; use one kind");
        }
        hvg.merge(s);
    }
    Ok(Profiles {
        genes: union.names,
        cells,
        labels,
        label_columns,
        sources,
        hvg,
    })
}

/// Poisson draw: inversion for small means, rounded normal approximation for large ones.
fn poisson(rng: &mut PhiloxStream, mean: f64) -> u32 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 30.0 {
        let z = standard_normal(rng);
        return (mean + mean.sqrt() * z).round().max(0.0) as u32;
    }
    let limit = (-mean).exp();
    let mut k = 0;
    let mut p = rng.unit_f64();
    while p > limit {
        k += 1;
        p *= rng.unit_f64();
    }
    k
}

fn standard_normal(rng: &mut PhiloxStream) -> f64 {
    let u1 = rng.unit_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.unit_f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The counts of synthetic cell `i`, over union genes, for genes kept by `keep` (u32::MAX = dropped).
/// Returns the real cell it was drawn from.
fn synth_cell(
    profiles: &Profiles,
    seed: u64,
    i: u64,
    keep: &[u32],
    out: &mut Vec<(u32, f32)>,
) -> usize {
    let mut rng = PhiloxStream::new(seed, Domain::Synth, i as u32, (i >> 32) as u32);
    let r = rng.below(profiles.cells.len() as u32) as usize;
    let (profile, library) = &profiles.cells[r];
    let depth = library * (0.3 * standard_normal(&mut rng)).exp();
    out.clear();
    for &(g, p) in profile {
        let target = keep[g as usize];
        if target == u32::MAX {
            continue;
        }
        let k = poisson(&mut rng, depth * p);
        if k > 0 {
            out.push((target, k as f32));
        }
    }
    r
}

pub fn run(opts: &SynthOptions) -> anyhow::Result<()> {
    if opts.cells == 0 || opts.cells > u64::from(u32::MAX) {
        bail!("--cells must be between 1 and {}", u32::MAX);
    }
    let started = std::time::Instant::now();
    let profiles = Arc::new(load_profiles(opts)?);
    eprintln!(
        "loaded {} real cells over {} genes from {} file(s); generating {} SYNTHETIC cells",
        profiles.cells.len(),
        profiles.genes.len(),
        opts.sources.len(),
        opts.cells
    );
    if opts.out.ends_with(".h5ad") {
        write_h5ad(opts, &profiles)?;
    } else {
        write_corpus(opts, &profiles)?;
    }
    eprintln!(
        "done in {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        opts.out
    );
    Ok(())
}

fn write_corpus(opts: &SynthOptions, profiles: &Arc<Profiles>) -> anyhow::Result<()> {
    let store = Store::open(&opts.out, &opts.s3)?;
    if store.exists(MANIFEST_FILE)? {
        bail!(
            "{} already holds a corpus; choose another --out or remove it first",
            opts.out
        );
    }
    let vocab = profiles.hvg.select(opts.hvg);
    let mut keep = vec![u32::MAX; profiles.genes.len()];
    for (pos, &g) in vocab.iter().enumerate() {
        keep[g] = pos as u32;
    }
    let n_vocab = vocab.len();
    let n_labels = profiles.label_columns.len();
    let bar = progress::bar(opts.cells, "synthesizing shards");
    let jobs = (0..opts.cells)
        .step_by(opts.shard_cells)
        .map(|start| Ok(start..(start + opts.shard_cells as u64).min(opts.cells)));
    let entries = write_shards(
        &store,
        jobs,
        opts.threads,
        opts.block_cells,
        &bar,
        |range: std::ops::Range<u64>| {
            let mut builder = ShardBuilder::new(n_vocab, n_labels);
            let mut counts = Vec::new();
            let mut keys: Vec<u64> = Vec::new();
            let mut nonzero: Vec<(u16, u8)> = Vec::new();
            let mut binner = Binner::default();
            let mut labels = vec![0u32; n_labels];
            for i in range {
                let r = synth_cell(profiles, opts.seed, i, &keep, &mut counts);
                for (l, codes) in profiles.labels.iter().enumerate() {
                    labels[l] = codes[r];
                }
                keys.clear();
                keys.extend(counts.iter().map(|&(g, v)| bin_key(v, g)));
                nonzero.clear();
                binner.bin(&mut keys, opts.bins, |pos, bin| {
                    nonzero.push((pos as u16, bin))
                });
                let origin = CellOrigin {
                    source: 0,
                    row: i,
                    name: format!("synth-{i}-from-{r}"),
                };
                builder.push_sparse(origin, &labels, nonzero.iter().copied());
            }
            Ok(builder)
        },
    )?;
    bar.finish_and_clear();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        synthetic: true,
        genes: vocab.iter().map(|&g| profiles.genes[g].clone()).collect(),
        vocabulary: VocabularySource::HighlyVariable {
            requested: opts.hvg,
            candidates: profiles.genes.len(),
        },
        bins: BinRule::per_cell_quantile(opts.bins),
        label_columns: profiles.label_columns.clone(),
        block_cells: opts.block_cells as u32,
        shards: entries,
        sources: profiles.sources.clone(),
        total_cells: opts.cells,
        created_by: format!(
            "cellfleet {} synth (seed {})",
            env!("CARGO_PKG_VERSION"),
            opts.seed
        ),
    };
    store.put(MANIFEST_FILE, serde_json::to_vec_pretty(&manifest)?.into())?;
    Ok(())
}

fn str_attr(loc: &hdf5::Location, name: &str, value: &str) -> hdf5::Result<()> {
    let v: hdf5::types::VarLenUnicode = value.parse().expect("attribute text has no NUL");
    loc.new_attr::<hdf5::types::VarLenUnicode>()
        .create(name)?
        .write_scalar(&v)
}

fn str_dataset(group: &hdf5::Group, name: &str, values: &[String]) -> hdf5::Result<hdf5::Dataset> {
    let data: Vec<hdf5::types::VarLenUnicode> =
        values.iter().map(|v| v.parse().expect("no NUL")).collect();
    let ds = group.new_dataset_builder().with_data(&data).create(name)?;
    str_attr(&ds, "encoding-type", "string-array")?;
    str_attr(&ds, "encoding-version", "0.2.0")?;
    Ok(ds)
}

/// CSR rows generated by one thread: column indices, counts, row lengths and the real cell each row
/// was drawn from.
#[derive(Default)]
struct GeneratedRows {
    indices: Vec<u32>,
    values: Vec<f32>,
    lengths: Vec<i64>,
    drawn_from: Vec<usize>,
}

/// Writes raw counts over all union genes as an AnnData (>= 0.8 encoding) file with a CSR X.
fn write_h5ad(opts: &SynthOptions, profiles: &Arc<Profiles>) -> anyhow::Result<()> {
    let path = PathBuf::from(&opts.out);
    if path.exists() {
        bail!("{} exists; remove it first", path.display());
    }
    let tmp = path.with_extension("h5ad.partial");
    let file =
        hdf5::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    str_attr(&file, "encoding-type", "anndata")?;
    str_attr(&file, "encoding-version", "0.1.0")?;
    let x = file.create_group("X")?;
    str_attr(&x, "encoding-type", "csr_matrix")?;
    str_attr(&x, "encoding-version", "0.1.0")?;
    let n_genes = profiles.genes.len();
    x.new_attr::<u64>()
        .shape(2)
        .create("shape")?
        .write(&[opts.cells, n_genes as u64])?;
    let chunk = 1 << 20;
    let data = x
        .new_dataset::<f32>()
        .chunk(chunk)
        .shape(0..)
        .create("data")?;
    let indices = x
        .new_dataset::<i32>()
        .chunk(chunk)
        .shape(0..)
        .create("indices")?;
    let keep: Vec<u32> = (0..n_genes as u32).collect();
    let mut indptr: Vec<i64> = Vec::with_capacity(opts.cells as usize + 1);
    indptr.push(0);
    let mut sources_of = Vec::with_capacity(opts.cells as usize);
    let bar = progress::bar(opts.cells, "synthesizing h5ad");
    let batch = 16_384u64;
    let threads = opts.threads.max(1) as u64;
    let mut start = 0u64;
    let mut written = 0usize;
    while start < opts.cells {
        let end = (start + batch * threads).min(opts.cells);
        // Generate in parallel, write in order.
        let parts: Vec<GeneratedRows> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let lo = (start + t * batch).min(end);
                    let hi = (lo + batch).min(end);
                    let keep = &keep;
                    scope.spawn(move || {
                        let mut rows = GeneratedRows::default();
                        let mut cell = Vec::new();
                        for i in lo..hi {
                            rows.drawn_from
                                .push(synth_cell(profiles, opts.seed, i, keep, &mut cell));
                            cell.sort_unstable_by_key(|&(g, _)| g);
                            rows.indices.extend(cell.iter().map(|&(g, _)| g));
                            rows.values.extend(cell.iter().map(|&(_, v)| v));
                            rows.lengths.push(cell.len() as i64);
                        }
                        rows
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("synth thread panicked"))
                .collect()
        });
        for GeneratedRows {
            indices: idx,
            values: val,
            lengths: lens,
            drawn_from: from,
        } in parts
        {
            let n = idx.len();
            data.resize(written + n)?;
            indices.resize(written + n)?;
            data.write_slice(&val, written..written + n)?;
            let idx: Vec<i32> = idx.into_iter().map(|g| g as i32).collect();
            indices.write_slice(&idx, written..written + n)?;
            written += n;
            for len in lens {
                indptr.push(indptr.last().unwrap() + len);
            }
            sources_of.extend(from);
        }
        bar.set_position(end);
        start = end;
    }
    bar.finish_and_clear();
    x.new_dataset_builder()
        .with_data(&indptr)
        .create("indptr")?;

    let obs = file.create_group("obs")?;
    str_attr(&obs, "_index", "_index")?;
    str_attr(&obs, "encoding-type", "dataframe")?;
    str_attr(&obs, "encoding-version", "0.2.0")?;
    let names: Vec<String> = (0..opts.cells).map(|i| format!("synth-{i}")).collect();
    str_dataset(&obs, "_index", &names)?;
    let order: Vec<hdf5::types::VarLenUnicode> = profiles
        .label_columns
        .iter()
        .map(|c| c.name.parse().expect("no NUL"))
        .collect();
    obs.new_attr::<hdf5::types::VarLenUnicode>()
        .shape(order.len())
        .create("column-order")?
        .write(&order)?;
    for (c, col) in profiles.label_columns.iter().enumerate() {
        let group = obs.create_group(&col.name)?;
        str_attr(&group, "encoding-type", "categorical")?;
        str_attr(&group, "encoding-version", "0.2.0")?;
        group
            .new_attr::<bool>()
            .create("ordered")?
            .write_scalar(&false)?;
        str_dataset(&group, "categories", &col.categories)?;
        let codes: Vec<i32> = sources_of
            .iter()
            .map(|&r| profiles.labels[c][r])
            .map(|code| {
                if code == MISSING_LABEL {
                    -1
                } else {
                    code as i32
                }
            })
            .collect();
        group
            .new_dataset_builder()
            .with_data(&codes)
            .create("codes")?;
    }
    let var = file.create_group("var")?;
    str_attr(&var, "_index", "_index")?;
    str_attr(&var, "encoding-type", "dataframe")?;
    str_attr(&var, "encoding-version", "0.2.0")?;
    var.new_attr::<hdf5::types::VarLenUnicode>()
        .shape(0)
        .create("column-order")?;
    str_dataset(&var, "_index", &profiles.genes)?;
    drop((data, indices, x, obs, var));
    file.close()?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot move {} into place", tmp.display()))?;
    Ok(())
}
