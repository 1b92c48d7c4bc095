//! A finished screen's tables: `genes.parquet` (one row per gene and state, with statistics), the optional
//! `cells.parquet` (one row per (gene, cell) pair) and `screen.json` beside them, written for pandas/polars
//! users; and the short top-hits summary printed after a run.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use cellfleet_shared::screen::attribution::{descending, normalised_means};
use cellfleet_shared::screen::transitions::{TransitionEffect, TransitionResults};
use cellfleet_shared::screen::{
    CompletedScreen, Merger, RecordEffect, RecordSteer, ScreenPlan, ScreenResults, TargetEffect,
    TargetKind, UnitResult,
};
use cellfleet_shared::screen::{
    MergedAttribution, RankedCell, RankingFile, RANKING_FILE, RANKING_FORMAT,
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
    if let Some(steer) = &results.steer {
        tables.extend(write_steer_tables(&plan, steer, out)?);
    }
    if let Some(transitions) = &results.transitions {
        tables.extend(write_transition_tables(&plan, transitions, out)?);
    }
    if let Some(attribution) = &results.attribution {
        tables.extend(write_attribution_tables(&plan, attribution, out)?);
    }
    if let (Some(records), Some(expression)) = (&results.records, &results.expression) {
        tables.push(super::anndata_output::write_cells_h5ad(
            &plan,
            records,
            expression,
            results.steer.as_deref(),
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

/// An attribution screen's outputs: `attribution.parquet` (per gene: the mean over cells of its
/// importance normalised per cell, signed and absolute, and its rank), `attribution_cells.parquet` (per
/// cell its `ranked_genes` most important genes), `attribution_pairs.parquet` (per cell its reference,
/// the logit gap and the attributions' sum) and `attribution_ranking.json` (what guided screens read).
fn write_attribution_tables(
    plan: &ScreenPlan,
    merged: &MergedAttribution,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let spec = plan.spec.attribution.as_ref().expect("an attribution plan");
    let n = plan.vocabulary.len();
    let (signed, absolute) = normalised_means(&merged.importance, n);
    let order = descending(&signed);
    let mut rank = vec![0i32; n];
    for (r, &g) in order.iter().enumerate() {
        rank[g] = r as i32 + 1;
    }
    let mut written = vec![write_table(
        &out.join("attribution.parquet"),
        "attribution",
        vec![
            (
                "gene".to_string(),
                Column::Text(plan.vocabulary.iter().map(|g| text(g)).collect()),
            ),
            (
                "gene_id".to_string(),
                Column::Int32((0..n as i32).collect()),
            ),
            ("importance".to_string(), Column::Double(signed.clone())),
            (
                "abs_importance".to_string(),
                Column::Double(absolute.clone()),
            ),
            ("rank".to_string(), Column::Int32(rank)),
        ],
    )?];
    let keep = (spec.ranked_genes as usize).min(n);
    let mut ranked_cells = Vec::with_capacity(plan.cells.len());
    let (mut cell_col, mut name_col, mut rank_col, mut gene_col, mut value_col, mut share_col) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (i, (&cell, name)) in plan.cells.iter().zip(&plan.cell_names).enumerate() {
        let row = &merged.importance[i * n..(i + 1) * n];
        let scores: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
        let total: f64 = scores
            .iter()
            .map(|v| v.abs())
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
        let genes: Vec<usize> = descending(&scores).into_iter().take(keep).collect();
        for (r, &g) in genes.iter().enumerate() {
            cell_col.push(cell as i64);
            name_col.push(text(name));
            rank_col.push(r as i32 + 1);
            gene_col.push(text(&plan.vocabulary[g]));
            value_col.push(scores[g]);
            share_col.push(scores[g] / total);
        }
        ranked_cells.push(RankedCell {
            cell,
            name: name.clone(),
            genes: genes.iter().map(|&g| plan.vocabulary[g].clone()).collect(),
        });
    }
    written.push(write_table(
        &out.join("attribution_cells.parquet"),
        "attribution_cells",
        vec![
            ("cell".to_string(), Column::Int64(cell_col)),
            ("cell_name".to_string(), Column::Text(name_col)),
            ("rank".to_string(), Column::Int32(rank_col)),
            ("gene".to_string(), Column::Text(gene_col)),
            ("importance".to_string(), Column::Double(value_col)),
            ("normalised".to_string(), Column::Double(share_col)),
        ],
    )?);
    written.push(write_table(
        &out.join("attribution_pairs.parquet"),
        "attribution_pairs",
        vec![
            (
                "cell".to_string(),
                Column::Int64(plan.cells.iter().map(|&c| c as i64).collect()),
            ),
            (
                "cell_name".to_string(),
                Column::Text(plan.cell_names.iter().map(|c| text(c)).collect()),
            ),
            (
                "reference".to_string(),
                Column::OptionalInt32(
                    (0..plan.cells.len())
                        .map(|i| plan.references.get(i).map(|&r| r as i32))
                        .collect(),
                ),
            ),
            (
                "logit_gap".to_string(),
                Column::Double(merged.logit_gap.iter().map(|&v| f64::from(v)).collect()),
            ),
            (
                "attribution_sum".to_string(),
                Column::Double(
                    merged
                        .attribution_sum
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect(),
                ),
            ),
        ],
    )?);
    let ranking = RankingFile {
        format: RANKING_FORMAT.into(),
        corpus_manifest_blake3: plan.corpus_manifest_blake3.clone(),
        class: spec.class.clone(),
        reference: spec.reference.name().into(),
        ranked_genes: keep as u32,
        cells: ranked_cells,
        overall: order.iter().map(|&g| plan.vocabulary[g].clone()).collect(),
        importance: signed,
        abs_importance: absolute,
    };
    let path = out.join(RANKING_FILE);
    fs::write(&path, serde_json::to_vec(&ranking)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    Ok(written)
}

/// One metric's values of a pruning curve.
type MetricOf = fn(&super::pruning::PruningCurve) -> &[f64];

/// Pruning curves: `pruning.parquet` (one row per order and fraction, with each order's areas) and
/// `pruning.svg` (accuracy and macro-F1 against the fraction of genes dropped).
pub(super) fn write_pruning_outputs(
    run: &super::pruning::PruningRun,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    use super::pruning::PruningCurve;
    let rows: Vec<(&PruningCurve, usize)> = run
        .curves
        .iter()
        .flat_map(|c| (0..c.fractions.len()).map(move |i| (c, i)))
        .collect();
    let table = write_table(
        &out.join("pruning.parquet"),
        "pruning",
        vec![
            (
                "order".to_string(),
                Column::Text(rows.iter().map(|(c, _)| text(c.order)).collect()),
            ),
            (
                "fraction".to_string(),
                Column::Double(rows.iter().map(|(c, i)| c.fractions[*i]).collect()),
            ),
            (
                "genes_dropped".to_string(),
                Column::Int64(
                    rows.iter()
                        .map(|(c, i)| c.genes_dropped[*i] as i64)
                        .collect(),
                ),
            ),
            (
                "accuracy".to_string(),
                Column::Double(rows.iter().map(|(c, i)| c.accuracy[*i]).collect()),
            ),
            (
                "macro_f1".to_string(),
                Column::Double(rows.iter().map(|(c, i)| c.macro_f1[*i]).collect()),
            ),
            (
                "accuracy_area".to_string(),
                Column::Double(
                    rows.iter()
                        .map(|(c, _)| PruningCurve::area(&c.accuracy, &c.fractions))
                        .collect(),
                ),
            ),
            (
                "macro_f1_area".to_string(),
                Column::Double(
                    rows.iter()
                        .map(|(c, _)| PruningCurve::area(&c.macro_f1, &c.fractions))
                        .collect(),
                ),
            ),
        ],
    )?;
    // Two panels side by side: accuracy, macro-F1.
    let (panel, height, margin) = (420.0, 380.0, 48.0);
    let colours = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#7f7f7f"];
    let max_fraction = run
        .curves
        .first()
        .and_then(|c| c.fractions.last().copied())
        .unwrap_or(1.0)
        .max(1e-9);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{margin}\" y=\"18\">Held-out {} classification ({} cells) as genes are dropped from the input</text>\n",
        2.0 * panel,
        xml_escape(&run.label_column),
        run.cells
    );
    let metrics: [(&str, MetricOf); 2] =
        [("accuracy", |c| &c.accuracy), ("macro-F1", |c| &c.macro_f1)];
    for (p, (metric, pick)) in metrics.into_iter().enumerate() {
        let left = p as f64 * panel;
        let x = |f: f64| left + margin + (panel - 2.0 * margin) * f / max_fraction;
        let y = |v: f64| height - margin - (height - 2.0 * margin - 20.0) * v.clamp(0.0, 1.0);
        svg.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{2:.1}\" y2=\"{1:.1}\" stroke=\"black\"/><line x1=\"{0:.1}\" y1=\"{3:.1}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"black\"/>\n<text x=\"{0:.1}\" y=\"{4:.1}\">{metric} vs fraction of genes dropped (0-{max_fraction:.2})</text>\n",
            left + margin,
            height - margin,
            left + panel - margin,
            y(1.0),
            height - 14.0,
        ));
        for tick in [0.0, 0.5, 1.0] {
            svg.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\">{tick:.1}</text>\n",
                left + 20.0,
                y(tick) + 4.0
            ));
        }
        for (k, curve) in run.curves.iter().enumerate() {
            let values = pick(curve);
            let points: Vec<String> = curve
                .fractions
                .iter()
                .zip(values)
                .map(|(&f, &v)| format!("{:.1},{:.1}", x(f), y(v)))
                .collect();
            let colour = colours[k % colours.len()];
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.8\" points=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{} (area {:.3})</text>\n",
                points.join(" "),
                left + margin + 8.0,
                y(0.0) - 12.0 - 14.0 * k as f64,
                curve.order,
                PruningCurve::area(values, &curve.fractions)
            ));
        }
    }
    svg.push_str("</svg>\n");
    let picture = out.join("pruning.svg");
    fs::write(&picture, svg).with_context(|| format!("cannot write {}", picture.display()))?;
    Ok(vec![table, picture])
}

/// A transitions screen's outputs: `transitions.parquet` (one row per screened perturbation, start state
/// and state) and `transitions.json` (the classes, the start states with their cells, the unperturbed
/// matrix and its entropies, and each perturbation's perturbed matrix and entropies).
fn write_transition_tables(
    plan: &ScreenPlan,
    transitions: &TransitionResults,
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let rows = &transitions.effects;
    let gene_id = |e: &TransitionEffect| {
        let target = &plan.targets[e.target as usize];
        (target.kind == TargetKind::Gene).then_some(target.genes[0] as i32)
    };
    let double = |f: fn(&TransitionEffect) -> f64| Column::Double(rows.iter().map(f).collect());
    let columns = vec![
        (
            "perturbation".to_string(),
            Column::Text(rows.iter().map(|e| text(&e.name)).collect()),
        ),
        (
            "kind".to_string(),
            Column::Text(rows.iter().map(|e| text(e.kind.name())).collect()),
        ),
        (
            "gene_id".to_string(),
            Column::OptionalInt32(rows.iter().map(gene_id).collect()),
        ),
        (
            "start".to_string(),
            Column::Text(rows.iter().map(|e| text(&e.start)).collect()),
        ),
        (
            "state".to_string(),
            Column::Text(rows.iter().map(|e| text(&e.state)).collect()),
        ),
        (
            "n_cells".to_string(),
            Column::Int64(rows.iter().map(|e| e.n_cells as i64).collect()),
        ),
        (
            "start_cells".to_string(),
            Column::Int64(rows.iter().map(|e| e.start_cells as i64).collect()),
        ),
        ("baseline".to_string(), double(|e| e.baseline)),
        ("perturbed".to_string(), double(|e| e.perturbed)),
        ("change".to_string(), double(|e| e.change)),
        (
            "mean_cell_change".to_string(),
            double(|e| e.mean_cell_change),
        ),
        ("p_value".to_string(), double(|e| e.p_value)),
        ("fdr".to_string(), double(|e| e.fdr)),
        (
            "terminated".to_string(),
            Column::Bool(rows.iter().map(|e| e.terminated).collect()),
        ),
        ("entropy_before".to_string(), double(|e| e.entropy_before)),
        ("entropy_after".to_string(), double(|e| e.entropy_after)),
        (
            "overall_entropy_before".to_string(),
            double(|e| e.overall_entropy_before),
        ),
        (
            "overall_entropy_after".to_string(),
            double(|e| e.overall_entropy_after),
        ),
    ];
    let table = write_table(&out.join("transitions.parquet"), "transitions", columns)?;
    let baseline = &transitions.baseline;
    let n_states = transitions.classes.len();
    let n_starts = transitions.starts.len();
    // Each perturbation's matrix, rebuilt from its rows (start-major, state-minor).
    let perturbations: Vec<serde_json::Value> = rows
        .chunks(n_starts * n_states)
        .map(|block| {
            serde_json::json!({
                "perturbation": block[0].name,
                "matrix": block.chunks(n_states).map(|r| r.iter().map(|e| e.perturbed).collect::<Vec<_>>()).collect::<Vec<_>>(),
                "class_entropy": block.chunks(n_states).map(|r| r[0].entropy_after).collect::<Vec<_>>(),
                "overall_entropy": block[0].overall_entropy_after,
                "terminated": block.iter().filter(|e| e.terminated).map(|e| [e.start.as_str(), e.state.as_str()]).collect::<Vec<_>>(),
            })
        })
        .collect();
    let summary = serde_json::json!({
        "format": "cellfleet-transitions/1",
        "classifier": plan.classifier.as_ref().map(|c| &c.url),
        "label_column": plan.classifier.as_ref().map(|c| &c.label_column),
        "states": transitions.classes,
        "starts": transitions.starts,
        "start_cells": baseline.cells,
        "terminate_below": plan.spec.transitions.as_ref().map(|t| t.terminate_below),
        "entropy": "nats; overall = sum over start states of prior * H(start) (the entropy: KD-CPT's equation 7 prints it with a stray minus sign)",
        "baseline": {
            "matrix": baseline.rows,
            "class_entropy": baseline.class_entropies(),
            "priors": baseline.priors(),
            "overall_entropy": baseline.overall_entropy(),
        },
        "perturbations": perturbations,
    });
    let path = out.join("transitions.json");
    fs::write(&path, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(vec![table, path])
}

/// A steered (MCMC) screen's diagnostics: `diagnostics.parquet` (one row per (perturbation, cell):
/// converged, split R-hat and ESS per statistic, mean acceptance), `acceptance.parquet` (per perturbation
/// and iteration, the acceptance rate over its cells' chains), `traces.parquet` (per perturbation, cell,
/// chain and iteration, the summary statistics) and `acceptance.svg` (the acceptance curves).
fn write_steer_tables(
    plan: &ScreenPlan,
    steer: &[RecordSteer],
    out: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    // Total expression, then the goal projection when the screen has a goal axis (as the records say).
    let n_statistics = steer.first().map_or(1, |r| r.rhat.len());
    let statistics = &["total_expression", "goal_projection"][..n_statistics.min(2)];
    let name = |r: &RecordSteer| text(&plan.targets[r.target as usize].name);
    let cell_name = |cell: u64| {
        let i = plan.cells.binary_search(&cell).expect("a screened cell");
        text(&plan.cell_names[i])
    };
    let mut columns = vec![
        (
            "perturbation".to_string(),
            Column::Text(steer.iter().map(name).collect()),
        ),
        (
            "cell".to_string(),
            Column::Int64(steer.iter().map(|r| r.cell as i64).collect()),
        ),
        (
            "cell_name".to_string(),
            Column::Text(steer.iter().map(|r| cell_name(r.cell)).collect()),
        ),
        (
            "converged".to_string(),
            Column::Bool(steer.iter().map(|r| r.converged).collect()),
        ),
        (
            "acceptance".to_string(),
            Column::Double(
                steer
                    .iter()
                    .map(|r| {
                        r.acceptance.iter().map(|&a| f64::from(a)).sum::<f64>()
                            / r.acceptance.len().max(1) as f64
                    })
                    .collect(),
            ),
        ),
    ];
    for (s, stat) in statistics.iter().enumerate() {
        columns.push((
            format!("rhat_{stat}"),
            Column::Double(steer.iter().map(|r| f64::from(r.rhat[s])).collect()),
        ));
        columns.push((
            format!("ess_{stat}"),
            Column::Double(steer.iter().map(|r| f64::from(r.ess[s])).collect()),
        ));
    }
    let mut written = vec![write_table(
        &out.join("diagnostics.parquet"),
        "steer_diagnostics",
        columns,
    )?];

    // Acceptance per perturbation and iteration, averaged over its cells.
    let iterations = steer.first().map_or(0, |r| r.acceptance.len());
    let mut curves: Vec<(u32, Vec<f64>, usize)> = Vec::new();
    for r in steer {
        if curves.last().map(|c| c.0) != Some(r.target) {
            curves.push((r.target, vec![0.0; iterations], 0));
        }
        let curve = curves.last_mut().expect("pushed");
        for (sum, &a) in curve.1.iter_mut().zip(&r.acceptance) {
            *sum += f64::from(a);
        }
        curve.2 += 1;
    }
    let (mut perturbation, mut iteration, mut rate) = (Vec::new(), Vec::new(), Vec::new());
    for (target, sums, cells) in &curves {
        for (it, sum) in sums.iter().enumerate() {
            perturbation.push(text(&plan.targets[*target as usize].name));
            iteration.push(it as i32);
            rate.push(sum / *cells as f64);
        }
    }
    written.push(write_table(
        &out.join("acceptance.parquet"),
        "steer_acceptance",
        vec![
            ("perturbation".into(), Column::Text(perturbation)),
            ("iteration".into(), Column::Int32(iteration)),
            ("acceptance".into(), Column::Double(rate)),
        ],
    )?);
    written.push(write_acceptance_svg(
        plan,
        &curves,
        &out.join("acceptance.svg"),
    )?);

    let chains = plan.spec.steer.as_ref().map_or(0, |s| s.chains as usize);
    let n_stats = statistics.len();
    let rows = steer.len() * chains * iterations;
    let (mut p, mut c, mut ch, mut it) = (
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
    );
    let mut values: Vec<Vec<f32>> = vec![Vec::with_capacity(rows); n_stats];
    for r in steer {
        for chain in 0..chains {
            for i in 0..iterations {
                p.push(name(r));
                c.push(r.cell as i64);
                ch.push(chain as i32);
                it.push(i as i32);
                for (s, v) in values.iter_mut().enumerate() {
                    v.push(r.trace[(chain * iterations + i) * n_stats + s]);
                }
            }
        }
    }
    let mut columns = vec![
        ("perturbation".to_string(), Column::Text(p)),
        ("cell".to_string(), Column::Int64(c)),
        ("chain".to_string(), Column::Int32(ch)),
        ("iteration".to_string(), Column::Int32(it)),
    ];
    for (stat, v) in statistics.iter().zip(values) {
        columns.push((stat.to_string(), Column::Float(v)));
    }
    written.push(write_table(
        &out.join("traces.parquet"),
        "steer_traces",
        columns,
    )?);
    Ok(written)
}

/// The acceptance rate per iteration as an SVG line chart (at most 12 perturbations drawn, the first in
/// plan order), for a person to open.
fn write_acceptance_svg(
    plan: &ScreenPlan,
    curves: &[(u32, Vec<f64>, usize)],
    path: &Path,
) -> anyhow::Result<PathBuf> {
    let (width, height, margin) = (720.0, 360.0, 48.0);
    let iterations = curves.first().map_or(1, |c| c.1.len()).max(2);
    let x = |i: usize| margin + (width - 2.0 * margin) * i as f64 / (iterations - 1) as f64;
    let y = |v: f64| height - margin - (height - 2.0 * margin) * v.clamp(0.0, 1.0);
    let colours = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf", "#393b79", "#637939",
    ];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{margin}\" y=\"20\">MH acceptance rate per iteration (mean over each perturbation's cells and chains)</text>\n"
    );
    svg.push_str(&format!(
        "<line x1=\"{margin}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/><line x1=\"{margin}\" y1=\"{margin}\" x2=\"{margin}\" y2=\"{0}\" stroke=\"black\"/>\n",
        height - margin,
        width - margin
    ));
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        svg.push_str(&format!(
            "<text x=\"8\" y=\"{:.1}\">{tick:.2}</text>\n",
            y(tick) + 4.0
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\">iteration (0-{})</text>\n",
        width / 2.0 - 40.0,
        height - 12.0,
        iterations - 1
    ));
    for (k, (target, rates, _)) in curves.iter().take(colours.len()).enumerate() {
        let points: Vec<String> = rates
            .iter()
            .enumerate()
            .map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let colour = colours[k];
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{}</text>\n",
            points.join(" "),
            width - margin + 4.0 - 120.0,
            margin + 14.0 * k as f64,
            xml_escape(&plan.targets[*target as usize].name)
        ));
    }
    svg.push_str("</svg>\n");
    fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path.to_path_buf())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
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
    ];
    if plan.spec.steer.is_some() {
        columns.push((
            "unconverged_cells".to_string(),
            Column::Int64(targets.iter().map(|g| g.unconverged_cells as i64).collect()),
        ));
    }
    columns.extend([(
        "cosine_shift".to_string(),
        Column::Double(targets.iter().map(|g| g.cosine_shift).collect()),
    )]);
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
    if let Some(merged) = &written.results.attribution {
        let (signed, absolute) = normalised_means(&merged.importance, plan.vocabulary.len());
        println!(
            "\ntop {n} genes by attribution of the {:?} logit ({} cells; mean importance normalised per cell):",
            plan.spec.attribution.as_ref().map_or("", |a| a.class.as_str()),
            plan.cells.len()
        );
        println!(
            "{:>5}  {:<14} {:>11} {:>15}",
            "rank", "gene", "importance", "|importance|"
        );
        for (r, g) in descending(&signed).into_iter().take(n).enumerate() {
            println!(
                "{:>5}  {:<14} {:>+11.5} {:>15.5}",
                r + 1,
                plan.vocabulary[g],
                signed[g],
                absolute[g]
            );
        }
        return;
    }
    if let Some(transitions) = &written.results.transitions {
        let mut moved: Vec<&TransitionEffect> = transitions
            .effects
            .iter()
            .filter(|e| e.start != e.state)
            .collect();
        moved.sort_by(|a, b| b.change.total_cmp(&a.change));
        println!(
            "\ntop {n} perturbations by their rise of a transition between states (of {} rows in transitions.parquet):",
            transitions.effects.len()
        );
        println!(
            "{:<14} {:<24} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "perturbation", "transition", "before", "after", "p", "FDR", "terminated"
        );
        for e in moved.iter().take(n) {
            println!(
                "{:<14} {:<24} {:>9.4} {:>10.4} {:>10.2e} {:>10.2e} {:>10}",
                e.name,
                format!("{} -> {}", e.start, e.state),
                e.baseline,
                e.perturbed,
                e.p_value,
                e.fdr,
                e.terminated
            );
        }
    }
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
