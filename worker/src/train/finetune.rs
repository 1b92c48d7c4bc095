//! Fine-tuning a pretrained model's `[CLS]` classifier on a label column (LoRA adapters with the base
//! frozen, or the whole network), evaluated on the held-out split.

use std::sync::Arc;

use anyhow::bail;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::stream::SplitPart;
use tch::{Kind, Tensor};

use cellfleet_shared::screen::transitions::inverse_frequency_weights;

use crate::collective::Solo;
use crate::model::{CellModel, LoraConfig};
use crate::train::batches::BatchStream;
use crate::train::config::RunOptions;
use crate::train::config::TrainConfig;
use crate::train::evaluate::batch_labels;
use crate::train::evaluate::evaluate_classifier;
use crate::train::evaluate::label_index;
use crate::train::evaluate::ClassificationEval;
use crate::train::saved_model::write_model;
use crate::train::saved_model::ModelInfo;
use crate::train::saved_model::SavedModel;
use crate::train::saved_model::MODEL_INFO_FORMAT;
use crate::train::training_loop::bf16;
use crate::train::training_loop::setup_torch;
use crate::train::training_loop::train_loop;
use crate::train::training_loop::LossParts;
use crate::train::training_loop::Participation;
use crate::train::training_loop::StepRecord;

/// How fine-tuning weighs each class's cross-entropy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClassWeighting {
    /// Every cell counts the same.
    #[default]
    None,
    /// Class k's terms weigh `N / (K n_k)` (`n_k` its training cells, `K` the classes present): rare
    /// classes count as much as common ones in total (CellxPert's remedy for its imbalanced labels).
    InverseFrequency,
}

/// The training cells of each class of label column `label_idx` (cells without a label not counted).
fn training_class_counts(
    corpus: &Corpus,
    label_idx: usize,
    classes: usize,
    split: cellfleet_shared::stream::CellSplit,
) -> anyhow::Result<Vec<u64>> {
    let columns = corpus.manifest.label_columns.len();
    let mut counts = vec![0u64; classes];
    let mut cell = 0u64;
    for s in 0..corpus.manifest.shards.len() {
        let shard = corpus.fetch_shard(s)?;
        for b in 0..shard.n_blocks() {
            let labels = shard.read_block(b)?.labels;
            for row in labels.chunks(columns.max(1)) {
                let code = row[label_idx];
                if split.part_of(cell) == SplitPart::Train && (code as usize) < classes {
                    counts[code as usize] += 1;
                }
                cell += 1;
            }
        }
    }
    Ok(counts)
}

/// Fine-tunes a pretrained model's `[CLS]` classifier on `label_column` (LoRA adapters of `lora_rank`
/// with the base frozen, or the whole network), then evaluates it on the held-out split.
pub fn finetune(
    corpus: Arc<Corpus>,
    base: &SavedModel,
    label_column: &str,
    lora_rank: Option<usize>,
    weighting: ClassWeighting,
    config: &TrainConfig,
    run: &RunOptions,
) -> anyhow::Result<(CellModel, Vec<StepRecord>, ClassificationEval)> {
    config.validate()?;
    base.check_corpus(&corpus)?;
    let (label_idx, classes) = label_index(&corpus, label_column)?;
    if classes.len() < 2 {
        bail!(
            "label column `{label_column}` has {} class(es); fine-tuning needs at least 2",
            classes.len()
        );
    }
    setup_torch(config, run);
    let mut model_config = base.info.config.clone();
    model_config.n_classes = classes.len();
    model_config.lora = lora_rank.map(|rank| LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
    });
    let model = base.load(model_config, run.device)?;
    if lora_rank.is_some() {
        model.freeze_base();
    }
    // The held-out cells are the base model's, so pretraining never saw the cells evaluated here.
    let split = base.info.split;
    let mut stream = BatchStream::new(
        corpus.clone(),
        config.order(config.augmentation),
        split,
        SplitPart::Train,
        model.config.layout,
        config.mask(),
        config.batch_size,
        config.loader_threads,
    );
    let columns = corpus.manifest.label_columns.len();
    let bf16 = bf16(run);
    let device = run.device;
    let class_weights = match weighting {
        ClassWeighting::None => None,
        ClassWeighting::InverseFrequency => {
            let counts = training_class_counts(&corpus, label_idx, classes.len(), split)?;
            let weights = inverse_frequency_weights(&counts);
            println!(
                "class weights (inverse frequency): {}",
                classes
                    .iter()
                    .zip(&counts)
                    .zip(&weights)
                    .map(|((c, n), w)| format!("{c} {w:.3} ({n} cells)"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Some(
                Tensor::from_slice(&weights.iter().map(|&w| w as f32).collect::<Vec<_>>())
                    .to_device(device),
            )
        }
    };
    let records = train_loop(
        &model,
        config,
        run,
        &mut stream,
        "finetune",
        &mut Participation::single_process(&mut Solo),
        |batch, forward, _| {
            let labels =
                Tensor::from_slice(&batch_labels(batch, label_idx, columns)).to_device(device);
            let logits = model
                .class_logits(&forward.hidden, bf16)
                .expect("classifier present");
            let known = labels.ne(-100);
            let hits = logits
                .argmax(-1, false)
                .eq_tensor(&labels)
                .logical_and(&known);
            LossParts {
                sum: logits.cross_entropy_loss::<&Tensor>(
                    &labels,
                    class_weights.as_ref(),
                    tch::Reduction::Sum,
                    -100,
                    0.0,
                ),
                correct: hits.sum(Kind::Float),
                count: known.sum(Kind::Float).double_value(&[]),
            }
        },
    )?;
    let info = ModelInfo {
        format: MODEL_INFO_FORMAT.into(),
        config: model.config.clone(),
        vocabulary_hash: base.info.vocabulary_hash.clone(),
        genes: base.info.genes.clone(),
        split,
        seed: config.seed,
        label_column: Some(label_column.to_string()),
        classes: classes.clone(),
    };
    write_model(&model, &info, &run.out)?;
    let eval = evaluate_classifier(&model, corpus, &info, config.batch_size, config.seed)?;
    Ok((model, records, eval))
}
