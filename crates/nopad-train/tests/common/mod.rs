//! What the integration tests share: the tiny preset on synthetic FLAN-like data.

use nopad_data::synthetic::LengthDist;
use nopad_train::{DataSource, ModelSource, TrainConfig};

/// A quiet CPU run of the tiny preset over `examples` synthetic examples.
pub fn tiny_run(
    steps: u64,
    examples: usize,
    max_len: usize,
    batch_size: usize,
    warmup: u64,
) -> TrainConfig {
    let mut c = TrainConfig::default_cpu();
    c.model = ModelSource::Preset("tiny".into());
    c.data = DataSource::Synthetic {
        dist: LengthDist::FlanLike,
        examples,
    };
    c.max_len = max_len;
    c.batch_size = batch_size;
    c.steps = Some(steps);
    c.warmup = warmup;
    c.lr = 1e-2;
    c.min_lr = 1e-3;
    c.progress = false;
    c
}
