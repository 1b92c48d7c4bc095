//! Training: masked-bin pretraining, `[CLS]` fine-tuning (full or LoRA) and evaluation on the held-out
//! split, with the baselines the results are read against.
//!
//! * `config`: `TrainConfig`, the schedule and the seed rules (what both the loop and checkpoints use);
//! * `batches`: the batch stream of one side of the split;
//! * `training_loop`: the loop every run goes through, and pretraining on it;
//! * `finetune`, `evaluate`: the `[CLS]` classifier, and held-out reports with their baselines;
//! * `checkpoint_state`: what a checkpoint holds, saving it in the background and restoring it;
//! * `saved_model`: `model.safetensors` + `model.json`; `outputs`: where they and the logs go (a
//!   directory or an object store);
//! * `optim`: AdamW with checkpointable state; `classification_metrics`: accuracy, F1, kappa, ECE.

pub mod batches;
pub mod checkpoint_state;
pub mod classification_metrics;
pub mod config;
pub mod evaluate;
pub mod finetune;
pub mod optim;
pub mod outputs;
pub mod saved_model;
pub mod training_loop;
