//! Every decoder of bytes that come from outside, entered as an attacker reaches it: the coverage-guided
//! fuzz targets (`fuzz/`) and the replay of the inputs they once failed on (`fuzz/regressions/`, a
//! workspace test) both call these, so a finding stays a regression case of exactly the code it broke.
//! Each function may return an error for any input; it must not panic, abort, hang or allocate without
//! bound.

use crate::checkpoint::CheckpointManifest;
use crate::corpus::manifest::Manifest;
use crate::corpus::shard::{Block, BlockDecompressor, Shard};
use crate::screen::{ScreenPlan, ScreenSpec, UnitResult, UNIT_MAGIC};

/// A shard's bytes as a hostile store could serve them with a matching manifest entry (the hash check
/// proves nothing when the store rewrote both): parse, decode every block, read every cell, the origins.
pub fn shard(data: &[u8]) {
    let Ok(shard) = Shard::parse("fuzz", bytes::Bytes::copy_from_slice(data)) else {
        return;
    };
    let mut block = Block::default();
    let Ok(mut zstd) = BlockDecompressor::new() else {
        return;
    };
    for b in 0..shard.n_blocks() {
        if shard.read_block_into(b, &mut block, &mut zstd).is_ok() {
            for cell in 0..block.cells {
                let _ = (block.bins_of(cell), block.labels_of(cell));
            }
        }
    }
    let _ = shard.origins();
}

/// A screen unit result: the stored bytes, and the same bytes as the payload inside a valid zstd frame
/// after the format's magic, so mutation reaches the header and arrays, not only the compression.
pub fn unit_result(data: &[u8]) {
    let _ = UnitResult::decode("fuzz", data);
    let mut payload = UNIT_MAGIC.to_vec();
    payload.extend_from_slice(data);
    if let Ok(frame) = zstd::bulk::compress(&payload, 1) {
        let _ = UnitResult::decode("fuzz", &frame);
    }
}

/// Corpus and checkpoint manifests and screen plans, as JSON, with the checks their readers apply.
pub fn manifests(data: &[u8]) {
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data) {
        if manifest.check().is_ok() {
            let _ = manifest.shard_offsets();
        }
    }
    let _ = serde_json::from_slice::<CheckpointManifest>(data);
    if let Ok(plan) = serde_json::from_slice::<ScreenPlan>(data) {
        if plan.check().is_ok() {
            for unit in 0..plan.unit_count().min(1 << 16) {
                let _ = plan.unit(unit);
            }
            let _ = plan.summary();
        }
    }
}

/// The safetensors header parser that checkpoints and exported weights go through.
pub fn safetensors(data: &[u8]) {
    let _ = crate::checkpoint::safetensors::parse(data, "fuzz");
}

/// A screen specification as JSON (`screen submit` of a .json file, the coordinator's stored specs),
/// validated as the CLI does.
pub fn screen_spec_json(data: &[u8]) {
    if let Ok(spec) = serde_json::from_slice::<ScreenSpec>(data) {
        let _ = spec.validate();
    }
}

/// splitmix64: the seeded source of the mutation suite's and the hostile-request test's inputs, so that a
/// seed makes the same hostile input on every machine.
pub struct SeededRng(pub u64);

impl SeededRng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A draw in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
