//! The binary result of one work unit: one record per (target, cell) the perturbation applies to,
//! target-major, and per target the summed change of every vocabulary gene's expected bin; encoded with a
//! magic line and checked on decode.

use serde::{Deserialize, Serialize};

use super::UNIT_MAGIC;
use super::{Result, ScreenError};

/// The most a unit result may decompress to (a unit of 64 targets x 64 cells with per-cell expression
/// over a 65,535-gene vocabulary would hold about 1 GiB; real units are far smaller).
pub const MAX_UNIT_BYTES: u64 = 2 << 30;

/// The measures of one perturbed cell against its unperturbed self: the cosine shift, then per state the
/// cosine shift toward it, then per state the progress toward it (`1 + 2 * states` values).
pub fn measure_len(n_states: usize) -> usize {
    1 + 2 * n_states
}

/// The result of one unit: one record per (target, cell) the perturbation applies to, in target-major
/// order, and per target the summed change of every vocabulary gene's expected bin.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitResult {
    pub unit: u32,
    /// blake3 of the plan it was computed for.
    pub plan_blake3: String,
    /// The unit's targets (indices into the plan's `targets`).
    pub targets: Vec<u32>,
    pub n_vocabulary: u32,
    pub n_states: u32,
    pub record_target: Vec<u32>,
    pub record_cell: Vec<u64>,
    /// 1 - cos(perturbed, original) per record.
    pub cosine_shift: Vec<f32>,
    /// Per record, per state: cos(perturbed, state) - cos(original, state) (`records x n_states`).
    pub state_shift: Vec<f32>,
    /// Per record, per state: how far the perturbation moves the cell along the axis from the perturbed
    /// population's centroid to the state's, as a fraction of that axis (`records x n_states`).
    pub state_progress: Vec<f32>,
    /// For each record of a pair target, in record order: the anchor alone, then the other gene alone,
    /// measured on the same coordinates as the pair (both genes left out), each `measure_len` values.
    pub alone: Vec<f32>,
    /// Per unit target, per vocabulary gene: the sum over this unit's cells of (perturbed - original)
    /// expected bin (`targets x n_vocabulary`; the target's own genes are 0).
    pub delta_bin_sum: Vec<f32>,
    /// With `execution.anndata`: the expected expression of every record (`records x n_vocabulary`) and of
    /// the unit's cells unperturbed (`cells x n_vocabulary`, in the unit's cell order).
    pub expression: Option<UnitExpression>,
    /// A steered screen's diagnostics, per record.
    pub steer: Option<UnitSteer>,
    /// A transitions screen's state probabilities.
    pub classes: Option<UnitClasses>,
    /// An attribution screen's attributions, one record per cell.
    pub attribution: Option<UnitAttribution>,
}

/// The gene attributions of an attribution unit's cells.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitAttribution {
    /// Per record, per vocabulary gene: its importance (`records x vocabulary`).
    pub importance: Vec<f32>,
    /// Per record: the logit difference between the cell and its reference, and the sum of the
    /// first direction's attributions (equal for a model linear in its input embeddings).
    pub logit_gap: Vec<f32>,
    pub attribution_sum: Vec<f32>,
}

/// The classifier's state probabilities `P(state | cell)` of a transitions unit.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitClasses {
    pub n_classes: u32,
    /// The unit's cells unperturbed (`cells x classes`, in the unit's cell order).
    pub original: Vec<f32>,
    /// Every record perturbed (`records x classes`).
    pub perturbed: Vec<f32>,
}

/// The chains' diagnostics of each record of a steered unit (MCMC only).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSteer {
    pub iterations: u32,
    pub chains: u32,
    /// Summary statistics traced per chain: total expression, then (with a goal) the projection on
    /// the goal axis.
    pub statistics: u32,
    /// Per record: 1 when every statistic's split R-hat is within `steer.rhat_max`.
    pub converged: Vec<u8>,
    /// Per record, per iteration: the fraction of its chains that accepted (`records x iterations`).
    pub acceptance: Vec<f32>,
    /// Per record, per statistic (`records x statistics`).
    pub rhat: Vec<f32>,
    pub ess: Vec<f32>,
    /// Per record, chain, iteration, statistic (`records x chains x iterations x statistics`).
    pub trace: Vec<f32>,
}

impl UnitSteer {
    /// Values per record in `trace`.
    pub fn trace_len(&self) -> usize {
        (self.chains * self.iterations * self.statistics) as usize
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnitExpression {
    pub perturbed: Vec<f32>,
    pub original: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct UnitHeader {
    unit: u32,
    plan_blake3: String,
    targets: Vec<u32>,
    n_vocabulary: u32,
    n_states: u32,
    records: u64,
    alone: u64,
    /// Cells of the unit's unperturbed expression, when the expression is stored.
    expression_cells: Option<u64>,
    /// A steered unit's (iterations, chains, statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    steer: Option<(u32, u32, u32)>,
    /// A transitions unit's (classes, cells).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    classes: Option<(u32, u64)>,
    /// Whether attributions follow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    attribution: bool,
}

fn put_le<T: Copy>(out: &mut Vec<u8>, values: &[T], to_le: impl Fn(T) -> Vec<u8>) {
    for &v in values {
        out.extend(to_le(v));
    }
}

impl UnitResult {
    pub fn records(&self) -> usize {
        self.record_target.len()
    }

    /// The stored form: a magic line, a JSON header, little-endian arrays, all zstd-compressed.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&UnitHeader {
            unit: self.unit,
            plan_blake3: self.plan_blake3.clone(),
            targets: self.targets.clone(),
            n_vocabulary: self.n_vocabulary,
            n_states: self.n_states,
            records: self.records() as u64,
            alone: self.alone.len() as u64,
            expression_cells: self
                .expression
                .as_ref()
                .map(|e| (e.original.len() / self.n_vocabulary.max(1) as usize) as u64),
            steer: self
                .steer
                .as_ref()
                .map(|s| (s.iterations, s.chains, s.statistics)),
            classes: self.classes.as_ref().map(|c| {
                (
                    c.n_classes,
                    (c.original.len() / c.n_classes.max(1) as usize) as u64,
                )
            }),
            attribution: self.attribution.is_some(),
        })
        .expect("a header always serializes");
        let mut raw = Vec::with_capacity(
            64 + header.len()
                + self.records() * (16 + 4 * self.n_states as usize)
                + self.delta_bin_sum.len() * 4,
        );
        raw.extend_from_slice(UNIT_MAGIC);
        raw.extend((header.len() as u32).to_le_bytes());
        raw.extend(header);
        let floats = |raw: &mut Vec<u8>, v: &[f32]| put_le(raw, v, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.record_target, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.record_cell, |v| v.to_le_bytes().to_vec());
        floats(&mut raw, &self.cosine_shift);
        floats(&mut raw, &self.state_shift);
        floats(&mut raw, &self.state_progress);
        floats(&mut raw, &self.alone);
        floats(&mut raw, &self.delta_bin_sum);
        if let Some(e) = &self.expression {
            floats(&mut raw, &e.perturbed);
            floats(&mut raw, &e.original);
        }
        if let Some(s) = &self.steer {
            raw.extend_from_slice(&s.converged);
            floats(&mut raw, &s.acceptance);
            floats(&mut raw, &s.rhat);
            floats(&mut raw, &s.ess);
            floats(&mut raw, &s.trace);
        }
        if let Some(c) = &self.classes {
            floats(&mut raw, &c.original);
            floats(&mut raw, &c.perturbed);
        }
        if let Some(a) = &self.attribution {
            floats(&mut raw, &a.importance);
            floats(&mut raw, &a.logit_gap);
            floats(&mut raw, &a.attribution_sum);
        }
        zstd::bulk::compress(&raw, 3).expect("compressing to memory cannot fail")
    }

    /// Decodes a stored result; every size is checked against the bytes that follow, and the whole
    /// against [`MAX_UNIT_BYTES`], before anything is allocated for it.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| ScreenError::UnitResult {
            key: key.to_string(),
            why,
        };
        // Decompressed at most up to the limit: a small hostile frame cannot expand into all memory.
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(bytes)
            .and_then(|decoder| {
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(decoder, MAX_UNIT_BYTES + 1),
                    &mut raw,
                )
            })
            .map_err(|e| bad(format!("not zstd: {e}")))?;
        if raw.len() as u64 > MAX_UNIT_BYTES {
            return Err(bad(format!(
                "decompresses to more than the {} MiB a unit result may hold",
                MAX_UNIT_BYTES >> 20
            )));
        }
        let rest = raw
            .strip_prefix(UNIT_MAGIC)
            .ok_or_else(|| bad("not a cellfleet screen unit result (of this version)".into()))?;
        let mut at = 0usize;
        // Sizes are products of header fields: checked, so a hostile header cannot wrap them around.
        let mut take = |factors: &[usize]| -> Result<&[u8]> {
            let n = factors
                .iter()
                .try_fold(1usize, |n, &f| n.checked_mul(f))
                .ok_or_else(|| bad(format!("its header's sizes {factors:?} overflow")))?;
            let slice = at
                .checked_add(n)
                .and_then(|end| rest.get(at..end))
                .ok_or_else(|| bad(format!("truncated at byte {at} (needs {n} more)")))?;
            at += n;
            Ok(slice)
        };
        let header_len = u32::from_le_bytes(take(&[4])?.try_into().expect("4 bytes")) as usize;
        let header: UnitHeader = serde_json::from_slice(take(&[header_len])?)
            .map_err(|e| bad(format!("unreadable header: {e}")))?;
        let records = header.records as usize;
        let states = header.n_states as usize;
        let vocabulary = header.n_vocabulary as usize;
        let record_target = take(&[records, 4])?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let record_cell = take(&[records, 8])?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let floats = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        };
        let cosine_shift = floats(take(&[records, 4])?);
        let state_shift = floats(take(&[records, states, 4])?);
        let state_progress = floats(take(&[records, states, 4])?);
        let alone = floats(take(&[header.alone as usize, 4])?);
        let delta_bin_sum = floats(take(&[header.targets.len(), vocabulary, 4])?);
        let expression = match header.expression_cells {
            Some(cells) => Some(UnitExpression {
                perturbed: floats(take(&[records, vocabulary, 4])?),
                original: floats(take(&[cells as usize, vocabulary, 4])?),
            }),
            None => None,
        };
        let steer = match header.steer {
            Some((iterations, chains, statistics)) => {
                let (i, c, s) = (iterations as usize, chains as usize, statistics as usize);
                let converged = take(&[records])?.to_vec();
                Some(UnitSteer {
                    iterations,
                    chains,
                    statistics,
                    converged,
                    acceptance: floats(take(&[records, i, 4])?),
                    rhat: floats(take(&[records, s, 4])?),
                    ess: floats(take(&[records, s, 4])?),
                    trace: floats(take(&[records, c, i, s, 4])?),
                })
            }
            None => None,
        };
        let classes = match header.classes {
            Some((n_classes, cells)) => {
                let cells = usize::try_from(cells).unwrap_or(usize::MAX);
                Some(UnitClasses {
                    n_classes,
                    original: floats(take(&[cells, n_classes as usize, 4])?),
                    perturbed: floats(take(&[records, n_classes as usize, 4])?),
                })
            }
            None => None,
        };
        let attribution = if header.attribution {
            Some(UnitAttribution {
                importance: floats(take(&[records, vocabulary, 4])?),
                logit_gap: floats(take(&[records, 4])?),
                attribution_sum: floats(take(&[records, 4])?),
            })
        } else {
            None
        };
        if at != rest.len() {
            return Err(bad(format!(
                "{} unexpected bytes at the end",
                rest.len() - at
            )));
        }
        Ok(Self {
            unit: header.unit,
            plan_blake3: header.plan_blake3,
            targets: header.targets,
            n_vocabulary: header.n_vocabulary,
            n_states: header.n_states,
            record_target,
            record_cell,
            cosine_shift,
            state_shift,
            state_progress,
            alone,
            delta_bin_sum,
            expression,
            steer,
            classes,
            attribution,
        })
    }
}
