//! `cells.h5ad`: the per-cell results as AnnData, for scanpy users. One observation per screened cell
//! unperturbed (the control group, `perturbation = "control"`), then one per (target, cell) record; `X`
//! is the model's expected expression in vocabulary order (a deleted gene reads 0), `obs` holds the
//! perturbation, the cell's corpus position, name and labels, and the shifts of `cells.parquet`. In a
//! steered screen `X` is in bins: the observed cells (control) and the predicted ones (the posterior
//! mean, or the token edit), with a `converged` column: the layout cell-eval reads (a perturbation
//! column and a control label).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::screen::{MergedExpression, RecordEffect, RecordSteer, ScreenPlan};
use cellfleet_shared::storage::S3Options;

use super::anndata::{H5adWriter, ObsColumn};
use super::plan::cell_labels;
use super::tables::{progress_columns, state_columns};

/// The perturbation name of the control group.
pub const CONTROL: &str = "control";

/// Writes `path` from the merged records and their expression.
pub fn write_cells_h5ad(
    plan: &ScreenPlan,
    records: &[RecordEffect],
    expression: &MergedExpression,
    steer: Option<&[RecordSteer]>,
    path: &Path,
    s3: &S3Options,
) -> anyhow::Result<PathBuf> {
    let n = plan.vocabulary.len();
    let (controls, total) = (plan.cells.len(), plan.cells.len() + records.len());
    let position: HashMap<u64, usize> = plan
        .cells
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, i))
        .collect();
    let row_cell: Vec<usize> = (0..controls)
        .chain(records.iter().map(|r| position[&r.cell]))
        .collect();

    let mut writer = H5adWriter::create(path, total, &plan.vocabulary)?;
    writer.write_rows(0, &expression.original)?;
    // Records in chunks, so a large screen is not copied whole.
    for (chunk, rows) in expression.perturbed.chunks(4096 * n).enumerate() {
        writer.write_rows(controls + chunk * 4096, rows)?;
    }

    let target_name = |r: &RecordEffect| plan.targets[r.target as usize].name.clone();
    let perturbation: Vec<String> = std::iter::repeat_n(CONTROL.to_string(), controls)
        .chain(records.iter().map(target_name))
        .collect();
    let obs_names: Vec<String> = row_cell
        .iter()
        .zip(&perturbation)
        .map(|(&i, p)| format!("{p}|{}", plan.cell_names[i]))
        .collect();
    let kind: Vec<String> = std::iter::repeat_n(CONTROL.to_string(), controls)
        .chain(
            records
                .iter()
                .map(|r| plan.targets[r.target as usize].kind.name().to_string()),
        )
        .collect();
    let mut columns = vec![
        (
            "perturbation".to_string(),
            ObsColumn::Categorical(perturbation),
        ),
        ("kind".to_string(), ObsColumn::Categorical(kind)),
        (
            "cell".to_string(),
            ObsColumn::I64(row_cell.iter().map(|&i| plan.cells[i] as i64).collect()),
        ),
        (
            "cell_name".to_string(),
            ObsColumn::Str(
                row_cell
                    .iter()
                    .map(|&i| plan.cell_names[i].clone())
                    .collect(),
            ),
        ),
    ];
    let corpus = Corpus::open(&plan.corpus_url, s3)
        .with_context(|| format!("reading the cells' labels from {}", plan.corpus_url))?;
    for (name, values) in cell_labels(&corpus, &plan.cells)? {
        columns.push((
            name,
            ObsColumn::Categorical(row_cell.iter().map(|&i| values[i].clone()).collect()),
        ));
    }
    let shift = |value: &dyn Fn(&RecordEffect) -> f32| -> ObsColumn {
        ObsColumn::F32(
            std::iter::repeat_n(f32::NAN, controls)
                .chain(records.iter().map(value))
                .collect(),
        )
    };
    columns.push(("cosine_shift".into(), shift(&|r| r.cosine_shift)));
    for (s, name) in state_columns(plan).into_iter().enumerate() {
        columns.push((name, shift(&|r| r.state_shift[s])));
    }
    for (s, name) in progress_columns(plan).into_iter().enumerate() {
        columns.push((name, shift(&|r| r.state_progress[s])));
    }
    if plan.anchor().is_some() {
        let pair = |pick: fn(&cellfleet_shared::screen::RecordPair) -> f32| {
            move |r: &RecordEffect| r.pair.as_ref().map_or(f32::NAN, pick)
        };
        columns.push(("anchor_alone".into(), shift(&pair(|p| p.anchor_alone))));
        columns.push(("gene_alone".into(), shift(&pair(|p| p.gene_alone))));
        columns.push(("interaction".into(), shift(&pair(|p| p.interaction))));
    }
    if let Some(steer) = steer {
        // Unconverged records keep their prediction here (flagged), and NaN shifts.
        columns.push((
            "converged".into(),
            ObsColumn::Categorical(
                std::iter::repeat_n("control".to_string(), controls)
                    .chain(steer.iter().map(|r| r.converged.to_string()))
                    .collect(),
            ),
        ));
    }
    let x_meaning = match &plan.spec.steer {
        Some(s) if s.method == cellfleet_shared::screen::SteerMethod::Mcmc => {
            "control rows: the observed bins; perturbed rows: the posterior mean bins of the retained MCMC states"
        }
        Some(_) => {
            "control rows: the observed bins; perturbed rows: the observed bins plus the token edit's change of expected bins"
        }
        None => "expected expression (bins) per vocabulary gene",
    };
    let uns = [
        ("readout".to_string(), plan.spec.readout.name().to_string()),
        ("layer".to_string(), plan.readout_layer.to_string()),
        (
            "perturbation_kind".to_string(),
            plan.spec.perturbation.kind.name().to_string(),
        ),
        ("checkpoint".to_string(), plan.checkpoint.url.clone()),
        (
            "checkpoint_step".to_string(),
            plan.checkpoint.step.to_string(),
        ),
        ("X".to_string(), x_meaning.to_string()),
        (
            "steer".to_string(),
            plan.spec.steer.as_ref().map_or_else(String::new, |s| {
                serde_json::to_string(s).unwrap_or_default()
            }),
        ),
    ];
    writer.finish(&obs_names, &columns, &uns)?;
    Ok(path.to_path_buf())
}
