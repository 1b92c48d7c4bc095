//! The binary result of one work unit: one record per (gene, cell) pair, gene-major, and per gene the
//! summed change of every vocabulary gene's expected bin; encoded with a magic line and checked on decode.

use serde::{Deserialize, Serialize};

use super::UNIT_MAGIC;
use super::{Result, ScreenError};

/// The result of one unit: one record per (gene, cell) pair the perturbation applies to, in gene-major
/// order, and per gene the summed change of every vocabulary gene's expected bin.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitResult {
    pub unit: u32,
    /// blake3 of the plan it was computed for.
    pub plan_blake3: String,
    pub genes: Vec<u32>,
    pub n_vocabulary: u32,
    pub n_states: u32,
    pub pair_gene: Vec<u32>,
    pub pair_cell: Vec<u64>,
    /// 1 - cos(perturbed, original) per pair.
    pub cosine_shift: Vec<f32>,
    /// Per pair, per state: cos(perturbed, state) - cos(original, state) (`pairs x n_states`).
    pub state_shift: Vec<f32>,
    /// Per pair, per state: how far the perturbation moves the cell along the axis from the perturbed
    /// population's centroid to the state's, as a fraction of that axis (`pairs x n_states`).
    pub state_progress: Vec<f32>,
    /// Per unit gene, per vocabulary gene: the sum over this unit's cells of (perturbed - original)
    /// expected bin (`genes x n_vocabulary`; the perturbed gene's own entry is 0).
    pub delta_bin_sum: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct UnitHeader {
    unit: u32,
    plan_blake3: String,
    genes: Vec<u32>,
    n_vocabulary: u32,
    n_states: u32,
    pairs: u64,
}

fn put_le<T: Copy>(out: &mut Vec<u8>, values: &[T], to_le: impl Fn(T) -> Vec<u8>) {
    for &v in values {
        out.extend(to_le(v));
    }
}

impl UnitResult {
    pub fn pairs(&self) -> usize {
        self.pair_gene.len()
    }

    /// The stored form: a magic line, a JSON header, little-endian arrays, all zstd-compressed.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&UnitHeader {
            unit: self.unit,
            plan_blake3: self.plan_blake3.clone(),
            genes: self.genes.clone(),
            n_vocabulary: self.n_vocabulary,
            n_states: self.n_states,
            pairs: self.pairs() as u64,
        })
        .expect("a header always serializes");
        let mut raw = Vec::with_capacity(
            64 + header.len()
                + self.pairs() * (16 + 4 * self.n_states as usize)
                + self.delta_bin_sum.len() * 4,
        );
        raw.extend_from_slice(UNIT_MAGIC);
        raw.extend((header.len() as u32).to_le_bytes());
        raw.extend(header);
        put_le(&mut raw, &self.pair_gene, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.pair_cell, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.cosine_shift, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.state_shift, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.state_progress, |v| v.to_le_bytes().to_vec());
        put_le(&mut raw, &self.delta_bin_sum, |v| v.to_le_bytes().to_vec());
        zstd::bulk::compress(&raw, 3).expect("compressing to memory cannot fail")
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| ScreenError::UnitResult {
            key: key.to_string(),
            why,
        };
        let raw = zstd::stream::decode_all(bytes).map_err(|e| bad(format!("not zstd: {e}")))?;
        let rest = raw
            .strip_prefix(UNIT_MAGIC)
            .ok_or_else(|| bad("not a cellfleet screen unit result".into()))?;
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let slice = rest
                .get(at..at + n)
                .ok_or_else(|| bad(format!("truncated at byte {at} (needs {n} more)")))?;
            at += n;
            Ok(slice)
        };
        let header_len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let header: UnitHeader = serde_json::from_slice(take(header_len)?)
            .map_err(|e| bad(format!("unreadable header: {e}")))?;
        let pairs = header.pairs as usize;
        let states = header.n_states as usize;
        let pair_gene = take(pairs * 4)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let pair_cell = take(pairs * 8)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let floats = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect()
        };
        let cosine_shift = floats(take(pairs * 4)?);
        let state_shift = floats(take(pairs * states * 4)?);
        let state_progress = floats(take(pairs * states * 4)?);
        let delta_bin_sum = floats(take(header.genes.len() * header.n_vocabulary as usize * 4)?);
        if at != rest.len() {
            return Err(bad(format!(
                "{} unexpected bytes at the end",
                rest.len() - at
            )));
        }
        Ok(Self {
            unit: header.unit,
            plan_blake3: header.plan_blake3,
            genes: header.genes,
            n_vocabulary: header.n_vocabulary,
            n_states: header.n_states,
            pair_gene,
            pair_cell,
            cosine_shift,
            state_shift,
            state_progress,
            delta_bin_sum,
        })
    }
}
