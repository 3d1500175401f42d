//! What the integration tests share: the tiny preset on synthetic FLAN-like data.
// Each test binary uses part of it.
#![allow(dead_code)]

use std::sync::Arc;

use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::{Loader, LoaderOptions, PackOptions, Strategy};
use nopad_model::lora::{LoraConfig, Target};
use nopad_model::Config;
use nopad_train::{DataSource, LoraTrain, ModelSource, TrainConfig};

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

/// LoRA adapters of rank `r` on every projection (alpha 2·r), over a bf16 base.
pub fn lora_train(r: usize, dropout: f32) -> LoraTrain {
    LoraTrain {
        settings: LoraConfig {
            r,
            alpha: 2.0 * r as f64,
            dropout,
            targets: Target::ALL.to_vec(),
            use_rslora: false,
            seed: 0,
        },
        adapter: None,
        base: Default::default(),
    }
}

/// A two-layer config whose every parameter range lies on a block of 256 (8-bit moments can be
/// updated group by group or sharded), tied or not.
pub fn block_aligned_config(tied: bool) -> Config {
    Config::from_json_str(
        &format!(
            r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":64,"hidden_size":256,"intermediate_size":512,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":512,"tie_word_embeddings":{tied}}}"#
        ),
        "test config",
    )
    .unwrap()
}

/// A loader of `examples` synthetic FLAN-like examples over `vocab` tokens (up to 40 tokens),
/// flattened three to a micro-batch, `grad_accum` micro-batches a step.
pub fn flatten_loader(vocab: usize, examples: usize, grad_accum: usize) -> Loader {
    let ex = instruction_dataset(&SyntheticConfig {
        n_examples: examples,
        vocab_size: vocab,
        lengths: LengthDist::FlanLike,
        max_len: 40,
        seed: 3,
    });
    let opts = LoaderOptions {
        pack: PackOptions {
            strategy: Strategy::Flatten,
            batch_size: 3,
            max_len: 40,
            pad_token_id: 0,
            group_by_length: false,
        },
        grad_accum,
        seed: 4,
        shuffle: true,
        start: Default::default(),
        prefetch: 1,
        parallel: nopad_data::DataParallel::ALONE,
    };
    Loader::new(Arc::new(ex), opts).unwrap()
}
