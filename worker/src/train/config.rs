//! What shapes a training run and its randomness: `TrainConfig` (read from TOML/JSON over defaults, then
//! flags), the run's execution options, the learning-rate schedule it implies, and torch's per-step seed.
//! Both the training loop and the checkpoint contents depend on this module, never the other way round.

use cellfleet_shared::ids::Rank;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context};
use cellfleet_shared::stream::batch::SequenceLayout;
use cellfleet_shared::stream::{CellSplit, OrderConfig};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::model::{FfnConfig, ModelConfig, Preset};
use crate::train::optim::AdamWConfig;
use crate::train::optim::Schedule;

/// Everything that shapes a training run; read from a TOML or JSON file over the defaults, then
/// overridden by command-line flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub preset: Preset,
    /// Overrides of the preset's shape.
    pub d_model: Option<usize>,
    pub n_layers: Option<usize>,
    pub n_heads: Option<usize>,
    pub ffn: Option<FfnConfig>,
    pub seed: u64,
    pub steps: u64,
    /// Samples per optimizer step.
    pub batch_size: u32,
    pub lr: f64,
    pub warmup_steps: u64,
    /// The cosine schedule ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub optimizer: AdamWConfig,
    /// Global gradient-norm clip; 0 disables it.
    pub clip_norm: f64,
    /// Weight of the MoE load-balancing loss.
    pub aux_loss_weight: f64,
    /// Fraction of gene tokens selected for prediction (pretraining); fine-tuning uses 0 unless set.
    pub mask_ratio: f32,
    /// Of the selected tokens, the shares given a random bin and left unchanged (the rest are masked):
    /// BERT's 0.1 and 0.1 train the bin head at tokens that look unmasked, where screens read it.
    pub mask_random_share: f32,
    pub mask_keep_share: f32,
    /// Clones per cell (bootstrapped permutation).
    pub augmentation: u32,
    pub window_units: u32,
    pub split: CellSplit,
    /// Batch-assembly threads.
    pub loader_threads: usize,
    /// Which gene tokens a sample holds: `{ kind = "full" }` (every vocabulary gene) or
    /// `{ kind = "expressed", unexpressed = N }` (the expressed genes and N unexpressed ones). Recorded
    /// in the model config, so every consumer of the checkpoint reads cells the same way.
    pub layout: SequenceLayout,
    /// Expressed layout: group cells of similar length into batches, sorting positions by sequence
    /// length inside windows of this many global batches (0: off). Deterministic and independent of the
    /// world size, so resume and exactly-once hold (see `shared/src/stream/bucket.rs`).
    pub bucket_batches: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            preset: Preset::Small,
            d_model: None,
            n_layers: None,
            n_heads: None,
            ffn: None,
            seed: 0,
            steps: 1000,
            batch_size: 32,
            lr: 1e-3,
            warmup_steps: 50,
            min_lr_ratio: 0.1,
            optimizer: AdamWConfig::default(),
            clip_norm: 1.0,
            aux_loss_weight: 0.01,
            mask_ratio: 0.15,
            mask_random_share: 0.1,
            mask_keep_share: 0.1,
            augmentation: 4,
            window_units: 16,
            split: CellSplit::default(),
            loader_threads: 1,
            layout: SequenceLayout::Full,
            bucket_batches: 0,
        }
    }
}

impl TrainConfig {
    /// Reads a `.toml` or `.json` config file over `defaults` (keys the file leaves out keep the
    /// defaults' values, nested tables included); unknown keys are errors.
    pub fn from_file(path: &Path, defaults: &TrainConfig) -> anyhow::Result<Self> {
        let context = || format!("config {}", path.display());
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let file: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).with_context(context)?
        } else {
            toml::from_str(&text).with_context(context)?
        };
        let mut merged = serde_json::to_value(defaults)?;
        merge_json(&mut merged, file);
        serde_json::from_value(merged).with_context(context)
    }

    pub fn model_config(&self, n_genes: usize, n_bins: usize) -> ModelConfig {
        let mut config = self.preset.config(n_genes, n_bins);
        config.d_model = self.d_model.unwrap_or(config.d_model);
        config.n_layers = self.n_layers.unwrap_or(config.n_layers);
        config.n_heads = self.n_heads.unwrap_or(config.n_heads);
        if let Some(ffn) = &self.ffn {
            config.ffn = ffn.clone();
        }
        config.layout = self.layout;
        config
    }

    /// How pretraining batches select and corrupt the tokens they predict.
    pub fn mask(&self) -> cellfleet_shared::stream::batch::MaskConfig {
        cellfleet_shared::stream::batch::MaskConfig {
            ratio: self.mask_ratio,
            random_share: self.mask_random_share,
            keep_share: self.mask_keep_share,
        }
    }

    pub fn order(&self, augmentation: u32) -> OrderConfig {
        OrderConfig {
            seed: self.seed,
            augmentation,
            window_units: self.window_units,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.steps == 0 || self.batch_size == 0 {
            bail!("steps and batch_size must be positive");
        }
        if self.lr.is_nan() || self.lr <= 0.0 {
            bail!("lr must be positive, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.mask_ratio) {
            bail!("mask_ratio must be in [0, 1), got {}", self.mask_ratio);
        }
        let (random, keep) = (self.mask_random_share, self.mask_keep_share);
        if !(0.0..=1.0).contains(&random) || !(0.0..=1.0).contains(&keep) || random + keep > 1.0 {
            bail!(
                "mask_random_share ({random}) and mask_keep_share ({keep}) must each be in [0, 1] and sum to at most 1"
            );
        }
        self.split.validate()?;
        Ok(())
    }
}

/// Overlays `top` on `base`: objects merge key by key, anything else replaces.
fn merge_json(base: &mut serde_json::Value, top: serde_json::Value) {
    match (base, top) {
        (serde_json::Value::Object(base), serde_json::Value::Object(top)) => {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(slot) if slot.is_object() && value.is_object() => merge_json(slot, value),
                    _ => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, top) => *base = top,
    }
}

/// Where and how a run executes (not part of the reproducible config).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: Device,
    /// Intra-op CPU threads of libtorch.
    pub threads: usize,
    /// Where the model and the step log go: a directory or an object-store location.
    pub out: crate::train::outputs::OutputDir,
    /// Print a progress bar (otherwise a log line every `log_every` steps).
    pub progress: bool,
    pub log_every: u64,
}

/// torch's seed for `step` on `rank`: a fixed function of the run seed, so a resumed run draws the same
/// router noise as an uninterrupted one.
pub fn step_seed(seed: u64, step: u64, rank: Rank) -> i64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"cellfleet torch step seed");
    hasher.update(&seed.to_le_bytes());
    hasher.update(&step.to_le_bytes());
    hasher.update(&u64::from(rank.get()).to_le_bytes());
    let bytes: [u8; 8] = hasher.finalize().as_bytes()[..8]
        .try_into()
        .expect("8 bytes");
    // Non-negative, as torch's seed is used as a u64 but passed as i64.
    (u64::from_le_bytes(bytes) >> 1) as i64
}

/// The learning-rate schedule of `config`.
pub fn schedule_of(config: &TrainConfig) -> Schedule {
    Schedule {
        peak: config.lr,
        warmup: config.warmup_steps,
        total: config.steps,
        min_ratio: config.min_lr_ratio,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/configs/pretrain.toml");
        let parsed = TrainConfig::from_file(&path, &TrainConfig::default()).unwrap();
        assert_eq!(parsed, TrainConfig::default());
    }

    #[test]
    fn the_expressed_layout_is_read_from_a_config_and_reaches_the_model_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("expressed.toml");
        fs::write(&path, "[layout]\nkind = \"expressed\"\nunexpressed = 16\n").unwrap();
        let parsed = TrainConfig::from_file(&path, &TrainConfig::default()).unwrap();
        let expected = SequenceLayout::Expressed { unexpressed: 16 };
        assert_eq!(parsed.layout, expected);
        assert_eq!(parsed.model_config(100, 10).layout, expected);
        fs::write(&path, "[layout]\nkind = \"ranked\"\n").unwrap();
        let error = format!(
            "{:#}",
            TrainConfig::from_file(&path, &TrainConfig::default()).unwrap_err()
        );
        assert!(
            error.contains("ranked") && error.contains("expressed"),
            "{error}"
        );
    }

    #[test]
    fn a_partial_config_keeps_the_callers_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ft.toml");
        fs::write(
            &path,
            "steps = 7\n[optimizer]\nweight_decay = 0.5\n[ffn]\nkind = \"dense\"\nhidden = 32\n",
        )
        .unwrap();
        let defaults = TrainConfig {
            mask_ratio: 0.0,
            lr: 2e-3,
            ..TrainConfig::default()
        };
        let parsed = TrainConfig::from_file(&path, &defaults).unwrap();
        assert_eq!(parsed.steps, 7);
        assert_eq!((parsed.mask_ratio, parsed.lr), (0.0, 2e-3));
        assert_eq!(parsed.optimizer.weight_decay, 0.5);
        assert_eq!(parsed.optimizer.beta1, 0.9);
        assert_eq!(parsed.ffn, Some(FfnConfig::Dense { hidden: 32 }));
        fs::write(&path, "stepz = 7\n").unwrap();
        let err = format!(
            "{:#}",
            TrainConfig::from_file(&path, &defaults).unwrap_err()
        );
        assert!(err.contains("stepz") && err.contains("ft.toml"), "{err}");
    }
}
