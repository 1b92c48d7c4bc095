//! What a client submits: a training job's specification, validated before the coordinator accepts it.

use serde::{Deserialize, Serialize};

use cellfleet_shared::stream::CellSplit;

/// A training job. `config` is the worker's full training configuration (JSON); the coordinator reads only
/// the fields that shape the data order and the step count, and the workers validate the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Corpus URL (`file://`, a path, or `s3://`).
    pub corpus: String,
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_region: Option<String>,
    pub config: serde_json::Value,
    /// Directory where rank 0 writes the trained model.
    pub out: String,
    pub min_workers: u32,
    pub max_workers: u32,
    /// Intra-op threads per worker (0: the worker's own setting).
    #[serde(default)]
    pub threads: u32,
    /// How long a collective waits for a peer before the rank gives up on the generation.
    #[serde(default = "default_collective_timeout_ms")]
    pub collective_timeout_ms: u64,
    /// Each rank appends the samples it trained on to `OUT/samples/g<generation>-r<rank>.jsonl`.
    #[serde(default)]
    pub sample_log: bool,
    /// Where and how often rank 0 checkpoints; recovery restarts from the newest committed checkpoint.
    #[serde(default)]
    pub checkpoint: Option<CheckpointSpec>,
    /// A verified checkpoint to start from instead of step 0 (resolved by the client before submitting).
    #[serde(default)]
    pub resume: Option<RestorePoint>,
    /// Stop after this step (with a checkpoint) although the schedule spans `config.steps`.
    #[serde(default)]
    pub stop_after: Option<u64>,
}

/// Checkpointing of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// The run's checkpoint location (`file://`, a path, or `s3://bucket/prefix`).
    pub url: String,
    /// Steps between saves (0: only at the end).
    pub every: u64,
    /// Retention: the newest `keep_last` checkpoints ...
    pub keep_last: u32,
    /// ... plus every one whose step is a multiple of `keep_every` (0: none).
    #[serde(default)]
    pub keep_every: u64,
    /// Upload bandwidth cap in bytes per second.
    #[serde(default)]
    pub max_upload_bytes_per_sec: Option<u64>,
    /// How long one object-store request retries before the save fails (the next save tries again).
    #[serde(default = "default_store_retry_ms")]
    pub store_retry_ms: u64,
}

fn default_store_retry_ms() -> u64 {
    60_000
}

/// A committed checkpoint: the run location and the step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestorePoint {
    pub url: String,
    pub step: u64,
    /// blake3 of the manifest rank 0 committed (empty when the client named the checkpoint).
    #[serde(default)]
    pub manifest_blake3: String,
}

fn default_collective_timeout_ms() -> u64 {
    10_000
}

/// The parts of the training configuration that the coordinator plans with.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct OrderFields {
    pub seed: u64,
    pub steps: u64,
    pub batch_size: u32,
    pub augmentation: u32,
    pub window_units: u32,
    pub split: CellSplit,
}

/// A parser's message, which quotes the offending value, cut to a readable length: a hostile value can
/// be megabytes long.
fn clip(message: &str) -> String {
    const MAX: usize = 400;
    if message.len() <= MAX {
        return message.to_string();
    }
    let mut end = MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &message[..end], message.len())
}

impl JobSpec {
    /// Parses and checks a submitted specification; the error names the field and what was expected.
    pub fn parse(json: &str) -> Result<(Self, OrderFields), String> {
        let spec: JobSpec = serde_json::from_str(json)
            .map_err(|e| format!("job specification: {}", clip(&e.to_string())))?;
        let order = spec.order()?;
        if spec.corpus.trim().is_empty() {
            return Err("job specification: `corpus` is empty".into());
        }
        if spec.out.trim().is_empty() {
            return Err("job specification: `out` is empty".into());
        }
        if spec.min_workers == 0 || spec.max_workers < spec.min_workers {
            return Err(format!(
                "job specification: need 1 <= min_workers <= max_workers, got min_workers {} and max_workers {}",
                spec.min_workers, spec.max_workers
            ));
        }
        if order.steps == 0 {
            return Err("job specification: config.steps must be positive".into());
        }
        if order.batch_size < spec.max_workers {
            return Err(format!(
                "job specification: config.batch_size {} is the global batch and must be at least max_workers {} (every rank needs samples)",
                order.batch_size, spec.max_workers
            ));
        }
        if spec.collective_timeout_ms == 0 || spec.collective_timeout_ms > 3_600_000 {
            return Err(format!(
                "job specification: collective_timeout_ms must be between 1 and 3600000 (an hour), got {}",
                spec.collective_timeout_ms
            ));
        }
        if let Some(ckpt) = &spec.checkpoint {
            if ckpt.url.trim().is_empty() {
                return Err("job specification: `checkpoint.url` is empty".into());
            }
            if ckpt.keep_last == 0 {
                return Err("job specification: `checkpoint.keep_last` must be at least 1".into());
            }
        }
        if let Some(resume) = &spec.resume {
            if resume.step == 0 || resume.step >= order.steps {
                return Err(format!(
                    "job specification: `resume.step` {} must be between 1 and config.steps - 1 ({})",
                    resume.step,
                    order.steps - 1
                ));
            }
        }
        if let Some(stop) = spec.stop_after {
            let from = spec.resume.as_ref().map_or(0, |r| r.step);
            if stop <= from || stop > order.steps {
                return Err(format!(
                    "job specification: `stop_after` {stop} must be after the start step {from} and at most config.steps {}",
                    order.steps
                ));
            }
        }
        Ok((spec, order))
    }

    /// The step the job ends at: `stop_after`, or the end of the schedule.
    pub fn end_step(&self, order: &OrderFields) -> u64 {
        self.stop_after.unwrap_or(order.steps).min(order.steps)
    }

    pub fn order(&self) -> Result<OrderFields, String> {
        serde_json::from_value(self.config.clone()).map_err(|e| {
            format!("job specification: `config` must be a full training configuration: {e}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min: u32, max: u32, batch: u32) -> String {
        serde_json::json!({
            "corpus": "/data/c", "out": "/tmp/o", "min_workers": min, "max_workers": max,
            "config": {"seed": 1, "steps": 10, "batch_size": batch, "augmentation": 4, "window_units": 16,
                       "split": {"seed": 0, "eval_fraction": 0.1}}
        })
        .to_string()
    }

    #[test]
    fn valid_specs_parse_and_bad_ones_say_why() {
        let (parsed, order) = JobSpec::parse(&spec(1, 2, 8)).unwrap();
        assert_eq!((parsed.max_workers, order.batch_size), (2, 8));
        assert!(JobSpec::parse(&spec(3, 2, 8))
            .unwrap_err()
            .contains("min_workers 3 and max_workers 2"));
        assert!(JobSpec::parse(&spec(1, 4, 2))
            .unwrap_err()
            .contains("batch_size 2"));
        assert!(JobSpec::parse(r#"{"corpus": 1}"#)
            .unwrap_err()
            .starts_with("job specification"));
        let no_steps = spec(1, 1, 8).replace("\"steps\":10,", "");
        assert!(JobSpec::parse(&no_steps)
            .unwrap_err()
            .contains("missing field `steps`"));
    }
}
