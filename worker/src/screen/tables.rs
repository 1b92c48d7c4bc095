//! A finished screen's tables: `genes.parquet` (one row per gene and state, with statistics), the optional
//! `cells.parquet` (one row per (gene, cell) pair) and `screen.json` beside them, written for pandas/polars
//! users; and the short top-hits summary printed after a run.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use cellfleet_shared::screen::{
    CompletedScreen, Merger, RecordEffect, ScreenPlan, ScreenResults, TargetEffect, UnitResult,
};
use cellfleet_shared::storage::S3Options;
use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{
    BoolType, ByteArray, ByteArrayType, DoubleType, FloatType, Int32Type, Int64Type,
};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde::Serialize;

use crate::screen::plan::load_plan;
use crate::screen::plan::open_location;
use crate::train::outputs::OutputDir;

/// What `screen.json` beside the tables records.
#[derive(Serialize)]
struct ScreenRecord<'a> {
    format: &'static str,
    screen_id: &'a str,
    location: &'a str,
    plan_blake3: &'a str,
    spec: &'a cellfleet_shared::screen::ScreenSpec,
    checkpoint: &'a cellfleet_shared::screen::CheckpointId,
    corpus: &'a str,
    corpus_manifest_blake3: &'a str,
    genes_screened: usize,
    null_genes: Vec<&'a str>,
    cells: usize,
    states: Vec<(&'a str, usize)>,
    units: usize,
    pairs: u64,
    units_released: u32,
    pairs_per_second: f64,
    message: &'a str,
    tables: Vec<String>,
}

/// The merged screen and where its tables are.
pub struct WrittenResults {
    pub plan: ScreenPlan,
    pub results: ScreenResults,
    /// Where the tables are: a directory or an object-store location.
    pub location: String,
}

/// Reads every completed unit (each exactly once, checked against its recorded hash), merges them and
/// writes `genes.parquet` (+ `cells.parquet`) and `screen.json` to `out`.
pub fn write_results(
    screen: &CompletedScreen,
    out: &str,
    per_cell: bool,
    s3: &S3Options,
) -> anyhow::Result<WrittenResults> {
    let output = OutputDir::open(out, s3)?;
    // Tables are written as files (Parquet, HDF5), so an object-store location gets them from a
    // staging directory, uploaded once complete.
    let staging = match output.local_path() {
        Some(dir) => Staging::Direct(dir.to_path_buf()),
        None => Staging::Upload(std::env::temp_dir().join(format!(
            "cellfleet-results-{}-{}",
            std::process::id(),
            screen.screen_id
        ))),
    };
    let written = write_tables(screen, staging.dir(), &output, per_cell, s3);
    if let Staging::Upload(dir) = &staging {
        if written.is_ok() {
            for entry in
                fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
            {
                let path = entry?.path();
                let name = path
                    .file_name()
                    .expect("a file")
                    .to_string_lossy()
                    .into_owned();
                output.put(
                    &name,
                    fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
                )?;
            }
        }
        let _ = fs::remove_dir_all(dir);
    }
    written
}

/// Where result files are written first.
enum Staging {
    /// The output directory itself.
    Direct(PathBuf),
    /// A local directory whose files are uploaded, then removed.
    Upload(PathBuf),
}

impl Staging {
    fn dir(&self) -> &Path {
        match self {
            Staging::Direct(dir) | Staging::Upload(dir) => dir,
        }
    }
}

fn write_tables(
    screen: &CompletedScreen,
    out: &Path,
    output: &OutputDir,
    per_cell: bool,
    s3: &S3Options,
) -> anyhow::Result<WrittenResults> {
    let store = open_location(&screen.location, s3)?;
    let plan = load_plan(&store, &screen.plan_blake3)?;
    let mut merger = Merger::new(&plan, &screen.plan_blake3);
    for unit in &screen.units {
        let bytes = store.get(&unit.key)?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        if hash != unit.blake3 {
            // A unit re-run after a lost lease rewrites its key; identical computations give identical
            // bytes, so a different hash means another computation (or damage): still a whole result of
            // the same unit if it decodes and matches the plan, which `add` checks.
            eprintln!(
                "warning: {} has blake3 {}, the coordinator recorded {} (rewritten by a re-run of unit {})",
                unit.key, hash, unit.blake3, unit.unit
            );
        }
        let result = UnitResult::decode(&unit.key, &bytes)?;
        if result.unit != unit.unit {
            bail!(
                "{} holds unit {}, expected {}",
                unit.key,
                result.unit,
                unit.unit
            );
        }
        merger.add(&unit.key, result)?;
    }
    let per_cell = per_cell || plan.spec.execution.per_cell;
    let results = merger.finish(per_cell || plan.spec.execution.anndata)?;
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut tables = vec![write_gene_table(
        &plan,
        &results.targets,
        &out.join("genes.parquet"),
    )?];
    if let (true, Some(records)) = (per_cell, &results.records) {
        tables.push(write_record_table(
            &plan,
            records,
            &out.join("cells.parquet"),
        )?);
    }
    if let (Some(records), Some(expression)) = (&results.records, &results.expression) {
        tables.push(super::anndata_output::write_cells_h5ad(
            &plan,
            records,
            expression,
            &out.join("cells.h5ad"),
            s3,
        )?);
    }
    let record = ScreenRecord {
        format: "cellfleet-screen-results/1",
        screen_id: screen.screen_id.as_str(),
        location: &screen.location,
        plan_blake3: &screen.plan_blake3,
        spec: &plan.spec,
        checkpoint: &plan.checkpoint,
        corpus: &plan.corpus_url,
        corpus_manifest_blake3: &plan.corpus_manifest_blake3,
        genes_screened: plan.genes.len(),
        null_genes: plan
            .null_genes
            .iter()
            .map(|&g| plan.vocabulary[g as usize].as_str())
            .collect(),
        cells: plan.cells.len(),
        states: plan
            .states
            .iter()
            .map(|s| (s.name.as_str(), s.cells.len()))
            .collect(),
        units: plan.unit_count(),
        pairs: results.total_records,
        units_released: screen.units_released,
        pairs_per_second: screen.pairs_per_second,
        message: &screen.message,
        tables: tables
            .iter()
            .map(|p| output.describe(&file_name(p)))
            .collect(),
    };
    fs::write(out.join("screen.json"), serde_json::to_vec_pretty(&record)?)
        .with_context(|| format!("cannot write {}", out.join("screen.json").display()))?;
    eprintln!(
        "wrote {} (+ screen.json: spec, checkpoint {} step {})",
        tables
            .iter()
            .map(|p| output.describe(&file_name(p)))
            .collect::<Vec<_>>()
            .join(", "),
        plan.checkpoint.url,
        plan.checkpoint.step
    );
    Ok(WrittenResults {
        plan,
        results,
        location: output.location().to_string(),
    })
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A Parquet column name for a state (`goal_shift` for the goal, `shift_to_<value>` for alternatives).
pub fn state_columns(plan: &ScreenPlan) -> Vec<String> {
    plan.states
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if i == 0 {
                "goal_shift".to_string()
            } else {
                let safe = cellfleet_shared::screen::column_suffix(&s.name);
                format!("shift_to_{safe}")
            }
        })
        .collect()
}

/// Progress columns: `goal_progress`, `progress_to_<value>`.
pub fn progress_columns(plan: &ScreenPlan) -> Vec<String> {
    state_columns(plan)
        .into_iter()
        .map(|c| {
            if c == "goal_shift" {
                "goal_progress".to_string()
            } else {
                c.replacen("shift_to_", "progress_to_", 1)
            }
        })
        .collect()
}

/// Typed column values of a flat table.
enum Column {
    Text(Vec<ByteArray>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Float(Vec<f32>),
    Double(Vec<f64>),
    Bool(Vec<bool>),
    /// Missing where `None`.
    OptionalInt32(Vec<Option<i32>>),
    /// A list per row (`values`, and where each row's list starts).
    TextList(Vec<ByteArray>, Vec<usize>),
    DoubleList(Vec<f64>, Vec<usize>),
}

impl Column {
    fn schema(&self, name: &str) -> String {
        match self {
            Column::Text(_) => format!("required binary {name} (UTF8);"),
            Column::Int32(_) => format!("required int32 {name};"),
            Column::Int64(_) => format!("required int64 {name};"),
            Column::Float(_) => format!("required float {name};"),
            Column::Double(_) => format!("required double {name};"),
            Column::Bool(_) => format!("required boolean {name};"),
            Column::OptionalInt32(_) => format!("optional int32 {name};"),
            Column::TextList(..) => format!(
                "required group {name} (LIST) {{ repeated group list {{ required binary element (UTF8); }} }}"
            ),
            Column::DoubleList(..) => format!(
                "required group {name} (LIST) {{ repeated group list {{ required double element; }} }}"
            ),
        }
    }
}

/// Definition and repetition levels of a required list of required elements (an empty list is a
/// definition level of 0 with no value).
fn list_levels(starts: &[usize], total: usize) -> (Vec<i16>, Vec<i16>) {
    let (mut def, mut rep) = (Vec::new(), Vec::new());
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(total);
        if start == end {
            def.push(0);
            rep.push(0);
        }
        for k in start..end {
            def.push(1);
            rep.push(i16::from(k > start));
        }
    }
    (def, rep)
}

fn write_table(
    path: &Path,
    table: &str,
    columns: Vec<(String, Column)>,
) -> anyhow::Result<PathBuf> {
    let message = format!(
        "message {table} {{ {} }}",
        columns
            .iter()
            .map(|(n, c)| c.schema(n))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let schema = Arc::new(parse_message_type(&message).context("Parquet schema")?);
    let properties = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
            .build(),
    );
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = SerializedFileWriter::new(file, schema, properties)?;
    let mut group = writer.next_row_group()?;
    let mut index = 0;
    while let Some(mut column) = group.next_column()? {
        match &columns[index].1 {
            Column::Text(v) => {
                column.typed::<ByteArrayType>().write_batch(v, None, None)?;
            }
            Column::Int32(v) => {
                column.typed::<Int32Type>().write_batch(v, None, None)?;
            }
            Column::Int64(v) => {
                column.typed::<Int64Type>().write_batch(v, None, None)?;
            }
            Column::Float(v) => {
                column.typed::<FloatType>().write_batch(v, None, None)?;
            }
            Column::Double(v) => {
                column.typed::<DoubleType>().write_batch(v, None, None)?;
            }
            Column::Bool(v) => {
                column.typed::<BoolType>().write_batch(v, None, None)?;
            }
            Column::OptionalInt32(v) => {
                let present: Vec<i32> = v.iter().flatten().copied().collect();
                let def: Vec<i16> = v.iter().map(|x| i16::from(x.is_some())).collect();
                column
                    .typed::<Int32Type>()
                    .write_batch(&present, Some(&def), None)?;
            }
            Column::TextList(v, starts) => {
                let (def, rep) = list_levels(starts, v.len());
                column
                    .typed::<ByteArrayType>()
                    .write_batch(v, Some(&def), Some(&rep))?;
            }
            Column::DoubleList(v, starts) => {
                let (def, rep) = list_levels(starts, v.len());
                column
                    .typed::<DoubleType>()
                    .write_batch(v, Some(&def), Some(&rep))?;
            }
        }
        column.close()?;
        index += 1;
    }
    group.close()?;
    writer.close()?;
    Ok(path.to_path_buf())
}

fn text(s: &str) -> ByteArray {
    ByteArray::from(s.as_bytes().to_vec())
}

/// The pair columns of a table whose plan has pairs: the anchor alone, the other gene alone, the
/// interaction (NaN on rows that are not pairs).
fn pair_columns<T>(
    columns: &mut Vec<(String, Column)>,
    rows: &[T],
    values: impl Fn(&T) -> Option<Vec<f64>>,
    names: &[&str],
) {
    for (i, name) in names.iter().enumerate() {
        columns.push((
            name.to_string(),
            Column::Double(
                rows.iter()
                    .map(|r| values(r).map_or(f64::NAN, |v| v[i]))
                    .collect(),
            ),
        ));
    }
}

/// `genes.parquet`: one row per screened target (a gene, a set or a pair), by rank (the columns are
/// documented in docs/screens.md).
fn write_gene_table(
    plan: &ScreenPlan,
    targets: &[TargetEffect],
    path: &Path,
) -> anyhow::Result<PathBuf> {
    let mut member_starts = Vec::with_capacity(targets.len());
    let mut members = Vec::new();
    for t in targets {
        member_starts.push(members.len());
        members.extend(t.genes.iter().map(|g| text(g)));
    }
    let mut columns = vec![
        (
            "rank".to_string(),
            Column::Int32(targets.iter().map(|g| g.rank as i32).collect()),
        ),
        (
            "gene".to_string(),
            Column::Text(targets.iter().map(|g| text(&g.name)).collect()),
        ),
        (
            "kind".to_string(),
            Column::Text(targets.iter().map(|g| text(g.kind.name())).collect()),
        ),
        (
            "genes".to_string(),
            Column::TextList(members, member_starts),
        ),
        (
            "gene_id".to_string(),
            Column::OptionalInt32(
                targets
                    .iter()
                    .map(|g| g.gene_id.map(|id| id as i32))
                    .collect(),
            ),
        ),
        (
            "n_cells".to_string(),
            Column::Int64(targets.iter().map(|g| g.n_cells as i64).collect()),
        ),
        (
            "cosine_shift".to_string(),
            Column::Double(targets.iter().map(|g| g.cosine_shift).collect()),
        ),
    ];
    for (s, name) in state_columns(plan).into_iter().enumerate() {
        columns.push((
            name,
            Column::Double(targets.iter().map(|g| g.state_shift[s]).collect()),
        ));
    }
    for (s, name) in progress_columns(plan).into_iter().enumerate() {
        columns.push((
            name,
            Column::Double(targets.iter().map(|g| g.state_progress[s]).collect()),
        ));
    }
    columns.push((
        "p_value".into(),
        Column::Double(targets.iter().map(|g| g.p_value).collect()),
    ));
    columns.push((
        "fdr".into(),
        Column::Double(targets.iter().map(|g| g.fdr).collect()),
    ));
    columns.push((
        "null_gene".into(),
        Column::Bool(targets.iter().map(|g| g.null_gene).collect()),
    ));
    let mut starts = Vec::with_capacity(targets.len());
    let (mut names, mut deltas) = (Vec::new(), Vec::new());
    for g in targets {
        starts.push(names.len());
        for (name, delta) in &g.top_affected {
            names.push(text(name));
            deltas.push(*delta);
        }
    }
    columns.push((
        "top_affected".into(),
        Column::TextList(names, starts.clone()),
    ));
    columns.push((
        "top_affected_delta_bin".into(),
        Column::DoubleList(deltas, starts),
    ));
    if plan.anchor().is_some() {
        pair_columns(
            &mut columns,
            targets,
            |t| {
                t.pair.as_ref().map(|p| {
                    vec![
                        p.anchor_alone,
                        p.gene_alone,
                        p.interaction,
                        p.p_value,
                        p.fdr,
                    ]
                })
            },
            &[
                "anchor_alone",
                "gene_alone",
                "interaction",
                "interaction_p_value",
                "interaction_fdr",
            ],
        );
    }
    columns.push((
        "readout".into(),
        Column::Text(
            targets
                .iter()
                .map(|_| text(plan.spec.readout.name()))
                .collect(),
        ),
    ));
    columns.push((
        "layer".into(),
        Column::Int32(targets.iter().map(|_| plan.readout_layer as i32).collect()),
    ));
    write_table(path, "screen_genes", columns)
}

/// `cells.parquet`: one row per perturbed (target, cell).
fn write_record_table(
    plan: &ScreenPlan,
    records: &[RecordEffect],
    path: &Path,
) -> anyhow::Result<PathBuf> {
    let names: std::collections::HashMap<u64, &str> = plan
        .cells
        .iter()
        .zip(&plan.cell_names)
        .map(|(&c, n)| (c, n.as_str()))
        .collect();
    let target = |r: &RecordEffect| &plan.targets[r.target as usize];
    let mut columns = vec![
        (
            "gene".to_string(),
            Column::Text(records.iter().map(|r| text(&target(r).name)).collect()),
        ),
        (
            "kind".to_string(),
            Column::Text(
                records
                    .iter()
                    .map(|r| text(target(r).kind.name()))
                    .collect(),
            ),
        ),
        (
            "gene_id".to_string(),
            Column::OptionalInt32(
                records
                    .iter()
                    .map(|r| {
                        let t = target(r);
                        (t.kind == cellfleet_shared::screen::TargetKind::Gene)
                            .then_some(t.genes[0] as i32)
                    })
                    .collect(),
            ),
        ),
        (
            "cell".to_string(),
            Column::Int64(records.iter().map(|p| p.cell as i64).collect()),
        ),
        (
            "cell_name".to_string(),
            Column::Text(
                records
                    .iter()
                    .map(|p| text(names.get(&p.cell).copied().unwrap_or("")))
                    .collect(),
            ),
        ),
        (
            "cosine_shift".to_string(),
            Column::Float(records.iter().map(|p| p.cosine_shift).collect()),
        ),
    ];
    for (s, name) in state_columns(plan).into_iter().enumerate() {
        columns.push((
            name,
            Column::Float(records.iter().map(|p| p.state_shift[s]).collect()),
        ));
    }
    for (s, name) in progress_columns(plan).into_iter().enumerate() {
        columns.push((
            name,
            Column::Float(records.iter().map(|p| p.state_progress[s]).collect()),
        ));
    }
    if plan.anchor().is_some() {
        pair_columns(
            &mut columns,
            records,
            |r| {
                r.pair.map(|p| {
                    vec![
                        f64::from(p.anchor_alone),
                        f64::from(p.gene_alone),
                        f64::from(p.interaction),
                    ]
                })
            },
            &["anchor_alone", "gene_alone", "interaction"],
        );
    }
    write_table(path, "screen_cells", columns)
}

/// Prints the `n` top-ranked genes and where the full tables are.
pub fn print_top(written: &WrittenResults, n: usize) {
    let plan = &written.plan;
    let goal = plan.goal();
    let targets = &written.results.targets;
    println!(
        "\ntop {} of {} {} ({}; ranked by {}):",
        n.min(targets.len()),
        targets.len(),
        if plan
            .targets
            .iter()
            .all(|t| t.kind == cellfleet_shared::screen::TargetKind::Gene)
        {
            "genes"
        } else {
            "perturbations"
        },
        plan.summary(),
        match goal {
            Some(g) => format!("progress toward {g}"),
            None => "cosine shift".into(),
        }
    );
    println!(
        "{:>5}  {:<14} {:>7} {:>9} {:>11} {:>10} {:>10} {:>10}  top affected genes (mean change of expected bin)",
        "rank", "gene", "cells", "progress", "goal shift", "cos shift", "p", "FDR"
    );
    for g in targets.iter().take(n) {
        println!(
            "{:>5}  {:<14} {:>7} {:>9} {:>11} {:>10.5} {:>10.2e} {:>10.2e}  {}",
            g.rank,
            g.name,
            g.n_cells,
            g.state_progress
                .first()
                .map_or("-".to_string(), |s| format!("{s:+.4}")),
            g.state_shift
                .first()
                .map_or("-".to_string(), |s| format!("{s:+.5}")),
            g.cosine_shift,
            g.p_value,
            g.fdr,
            g.top_affected
                .iter()
                .take(3)
                .map(|(name, d)| format!("{name} {d:+.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let significant = targets.iter().filter(|g| g.fdr < 0.05).count();
    println!(
        "{significant} at FDR < 0.05 against {} random null genes; full results in {}",
        plan.null_genes.len(),
        written.location
    );
}
