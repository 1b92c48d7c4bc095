//! What a worker process exposes on `/metrics` (`cellfleet worker --metrics-listen ADDR`): one set of
//! process-wide atomics that training, checkpointing and screens update as they go, rendered in the
//! Prometheus text format on each scrape.

use cellfleet_shared::telemetry::{Counter, Gauge, Kind, MetricsText, Timing};

/// Training: the current generation and the steps this process ran.
pub struct TrainMetrics {
    pub generation: Gauge,
    pub rank: Gauge,
    pub world: Gauge,
    pub step: Gauge,
    pub step_seconds: Timing,
    /// Time inside the gradient all-reduce, per step.
    pub collective_seconds: Timing,
    pub tokens: Counter,
    pub tokens_per_second: Gauge,
    pub loss: Gauge,
    pub generations_joined: Counter,
}

/// Checkpoint saves this process committed (rank 0).
pub struct CheckpointMetrics {
    pub save_seconds: Timing,
    pub stored_bytes: Counter,
    pub raw_bytes: Counter,
}

/// Screen work units this process computed.
pub struct ScreenMetrics {
    pub units: Counter,
    pub pairs: Counter,
    pub unit_seconds: Timing,
    pub pairs_per_second: Gauge,
}

pub static TRAIN: TrainMetrics = TrainMetrics {
    generation: Gauge::new(),
    rank: Gauge::new(),
    world: Gauge::new(),
    step: Gauge::new(),
    step_seconds: Timing::new(),
    collective_seconds: Timing::new(),
    tokens: Counter::new(),
    tokens_per_second: Gauge::new(),
    loss: Gauge::new(),
    generations_joined: Counter::new(),
};

pub static CHECKPOINT: CheckpointMetrics = CheckpointMetrics {
    save_seconds: Timing::new(),
    stored_bytes: Counter::new(),
    raw_bytes: Counter::new(),
};

pub static SCREEN: ScreenMetrics = ScreenMetrics {
    units: Counter::new(),
    pairs: Counter::new(),
    unit_seconds: Timing::new(),
    pairs_per_second: Gauge::new(),
};

/// Whether the worker's assignment stream to the coordinator is open (1) or not (0).
pub static CONNECTED: Gauge = Gauge::new();

/// The worker's metrics; `worker` and `device` label the info sample.
pub fn render(worker: &str, device: &str) -> String {
    let mut text = MetricsText::new();
    text.family(
        "cellfleet_worker_info",
        Kind::Gauge,
        "This worker's id and device (always 1)",
    )
    .sample(
        "cellfleet_worker_info",
        &[("worker", worker), ("device", device)],
        1.0,
    );
    text.single(
        "cellfleet_worker_connected",
        Kind::Gauge,
        "1 while the assignment stream to the coordinator is open",
        CONNECTED.get(),
    );
    let t = &TRAIN;
    text.single(
        "cellfleet_train_generation",
        Kind::Gauge,
        "Generation of the job this worker last trained in",
        t.generation.get(),
    )
    .single(
        "cellfleet_train_rank",
        Kind::Gauge,
        "This worker's rank in that generation",
        t.rank.get(),
    )
    .single(
        "cellfleet_train_world_size",
        Kind::Gauge,
        "Ranks in that generation",
        t.world.get(),
    )
    .single(
        "cellfleet_train_generations_joined_total",
        Kind::Counter,
        "Generations this worker has trained in",
        t.generations_joined.get(),
    )
    .single(
        "cellfleet_train_step",
        Kind::Gauge,
        "Steps completed (global step count)",
        t.step.get(),
    )
    .timing(
        "cellfleet_train_step_seconds",
        "Wall time of a training step on this rank",
        &t.step_seconds,
    )
    .timing(
        "cellfleet_train_collective_seconds",
        "Time a step spent in the gradient all-reduce",
        &t.collective_seconds,
    )
    .single(
        "cellfleet_train_tokens_total",
        Kind::Counter,
        "Real (unpadded) tokens this rank trained on",
        t.tokens.get(),
    )
    .single(
        "cellfleet_train_tokens_per_second",
        Kind::Gauge,
        "Tokens per second of the most recent step on this rank",
        t.tokens_per_second.get(),
    )
    .single(
        "cellfleet_train_loss",
        Kind::Gauge,
        "Loss of the most recent step (this rank's batch)",
        t.loss.get(),
    );
    let c = &CHECKPOINT;
    text.timing(
        "cellfleet_checkpoint_save_seconds",
        "Wall time of a committed checkpoint save (snapshot to manifest)",
        &c.save_seconds,
    )
    .single(
        "cellfleet_checkpoint_stored_bytes_total",
        Kind::Counter,
        "Bytes of committed checkpoints as stored (compressed)",
        c.stored_bytes.get(),
    )
    .single(
        "cellfleet_checkpoint_raw_bytes_total",
        Kind::Counter,
        "Bytes of committed checkpoints before compression",
        c.raw_bytes.get(),
    );
    let s = &SCREEN;
    text.single(
        "cellfleet_worker_screen_units_total",
        Kind::Counter,
        "Screen work units this worker completed",
        s.units.get(),
    )
    .single(
        "cellfleet_worker_screen_pairs_total",
        Kind::Counter,
        "(gene, cell) pairs this worker computed",
        s.pairs.get(),
    )
    .timing(
        "cellfleet_worker_screen_unit_seconds",
        "Wall time of a screen work unit",
        &s.unit_seconds,
    )
    .single(
        "cellfleet_worker_screen_pairs_per_second",
        Kind::Gauge,
        "Pairs per second of the most recent unit",
        s.pairs_per_second.get(),
    );
    text.finish()
}
