//! Fine-tuning a pretrained model's `[CLS]` classifier on a label column (LoRA adapters with the base
//! frozen, or the whole network), evaluated on the held-out split.

use std::sync::Arc;

use anyhow::bail;
use cellfleet_shared::corpus::Corpus;
use cellfleet_shared::stream::SplitPart;
use tch::{Kind, Tensor};

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

/// Fine-tunes a pretrained model's `[CLS]` classifier on `label_column` (LoRA adapters of `lora_rank`
/// with the base frozen, or the whole network), then evaluates it on the held-out split.
pub fn finetune(
    corpus: Arc<Corpus>,
    base: &SavedModel,
    label_column: &str,
    lora_rank: Option<usize>,
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
                sum: logits.cross_entropy_loss::<Tensor>(
                    &labels,
                    None,
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
