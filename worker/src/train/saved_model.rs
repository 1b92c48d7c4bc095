//! A trained model on disk: `model.safetensors` (weights by parameter name) and `model.json` (config,
//! vocabulary and its hash, split, classes) beside it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::stream::CellSplit;
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::model::{CellModel, ModelConfig};
use crate::train::checkpoint_state::{read_state, MODEL_OBJECT};
use cellfleet_shared::checkpoint::{CheckpointManifest, Checkpoints};

/// What `model.json` beside the weights records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub format: String,
    pub config: ModelConfig,
    /// blake3 of the vocabulary (gene names joined by newlines): a corpus must match it.
    pub vocabulary_hash: String,
    pub genes: Vec<String>,
    pub split: CellSplit,
    pub seed: u64,
    #[serde(default)]
    pub label_column: Option<String>,
    #[serde(default)]
    pub classes: Vec<String>,
}

pub const MODEL_INFO_FORMAT: &str = "cellfleet-model/1";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INFO_FILE: &str = "model.json";

pub fn vocabulary_hash(genes: &[String]) -> String {
    blake3::hash(genes.join("\n").as_bytes())
        .to_hex()
        .to_string()
}

/// A saved model: `DIR/model.safetensors` + `DIR/model.json`, or the path of the weights file itself.
pub struct SavedModel {
    pub weights: PathBuf,
    pub info: ModelInfo,
}

impl SavedModel {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let (weights, info_path) = if path.is_dir() {
            (path.join(WEIGHTS_FILE), path.join(INFO_FILE))
        } else {
            (path.to_path_buf(), path.with_file_name(INFO_FILE))
        };
        if !weights.exists() {
            bail!(
                "{}: no weights file here (expected {WEIGHTS_FILE} written by `cellfleet train`)",
                weights.display()
            );
        }
        let text = fs::read_to_string(&info_path).with_context(|| {
            format!(
                "{}: the model description that belongs beside the weights is missing",
                info_path.display()
            )
        })?;
        let info: ModelInfo = serde_json::from_str(&text).with_context(|| {
            format!("{}: not a cellfleet model description", info_path.display())
        })?;
        if info.format != MODEL_INFO_FORMAT {
            bail!(
                "{}: format {:?}, expected {MODEL_INFO_FORMAT:?}",
                info_path.display(),
                info.format
            );
        }
        Ok(Self { weights, info })
    }

    /// Checks that `corpus` uses this model's vocabulary.
    pub fn check_corpus(&self, corpus: &Corpus) -> anyhow::Result<()> {
        if vocabulary_hash(&corpus.manifest.genes) != self.info.vocabulary_hash {
            bail!(
                "corpus {} has a different gene vocabulary ({} genes) from the model ({} genes); ingest it with `--genes {}` so it uses the model's genes",
                corpus.store.url(),
                corpus.manifest.genes.len(),
                self.info.genes.len(),
                self.weights.with_file_name(INFO_FILE).display()
            );
        }
        Ok(())
    }

    pub fn load(&self, config: ModelConfig, device: Device) -> anyhow::Result<CellModel> {
        let mut model = CellModel::new(config, device)?;
        let missing = model.load(&self.weights, true)?;
        if let Some(bad) = missing
            .iter()
            .find(|n| !(n.contains("lora_") || n.starts_with("classifier.")))
        {
            bail!("{}: parameter {bad} is missing", self.weights.display());
        }
        Ok(model)
    }
}

pub(crate) fn write_model(
    model: &CellModel,
    info: &ModelInfo,
    out: &crate::train::outputs::OutputDir,
) -> anyhow::Result<()> {
    let params = model.named_parameters();
    let named: Vec<(String, &tch::Tensor)> = params.iter().map(|(n, t)| (n.clone(), t)).collect();
    out.put(
        WEIGHTS_FILE,
        crate::train::checkpoint_state::safetensors_image(&named)?,
    )?;
    out.put(INFO_FILE, serde_json::to_string_pretty(info)?.into_bytes())?;
    Ok(())
}

/// What [`export_checkpoint`] wrote besides the weights file.
pub struct Exported {
    pub weights_bytes: usize,
    /// `model.json` beside the weights.
    pub info_path: PathBuf,
}

/// Writes a checkpoint's weights to `out` (the stored safetensors image, hash-verified, byte for byte) and
/// a `model.json` beside them that `cellfleet eval` and the PyTorch loader read.
pub fn export_checkpoint(
    checkpoints: &Checkpoints,
    manifest: &CheckpointManifest,
    out: &Path,
) -> anyhow::Result<Exported> {
    let state = read_state(checkpoints, manifest)?;
    let weights = checkpoints
        .read(manifest, MODEL_OBJECT)?
        .map_err(|p| anyhow::anyhow!("{p}"))?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(out, &weights).with_context(|| format!("cannot write {}", out.display()))?;
    let info = ModelInfo {
        format: MODEL_INFO_FORMAT.into(),
        config: state.model.clone(),
        vocabulary_hash: vocabulary_hash(&state.genes),
        genes: state.genes.clone(),
        split: state.config.split,
        seed: state.config.seed,
        label_column: None,
        classes: Vec::new(),
    };
    let info_path = dir.join(INFO_FILE);
    std::fs::write(&info_path, serde_json::to_string_pretty(&info)?)
        .with_context(|| format!("cannot write {}", info_path.display()))?;
    Ok(Exported {
        weights_bytes: weights.len(),
        info_path,
    })
}
