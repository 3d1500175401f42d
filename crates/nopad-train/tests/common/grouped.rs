//! A model for tests that update group by group: every parameter range on a block of 256, so
//! 8-bit moments can be updated one group at a time.

use std::sync::Arc;

use nopad_backend::cpu::Cpu;
use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::{Loader, LoaderOptions, PackOptions, Strategy};
use nopad_model::{Config, Model};
use nopad_train::{train_step, Optimizer, SingleProcess, StepOutcome};

type B = Cpu<f32>;

/// A two-layer model whose every parameter range lies on a block of 256 (8-bit moments can be
/// updated group by group), tied or not, and a loader of one micro-batch a step.
pub fn setup(b: &B, tied: bool) -> (Model<B>, Loader) {
    let cfg = Config::from_json_str(
        &format!(
            r#"{{"architectures":["LlamaForCausalLM"],"vocab_size":64,"hidden_size":256,"intermediate_size":512,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":512,"tie_word_embeddings":{tied}}}"#
        ),
        "test config",
    )
    .unwrap();
    let mut model = Model::new(b, cfg.clone()).unwrap();
    let layout = model.layout.clone();
    nopad_model::weights::init_random(&cfg, &layout, 7, |o, v| model.write_params(b, o, v))
        .unwrap();
    let ex = instruction_dataset(&SyntheticConfig {
        n_examples: 32,
        vocab_size: cfg.vocab_size,
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
        grad_accum: 1,
        seed: 4,
        shuffle: true,
        start: Default::default(),
        prefetch: 1,
        parallel: nopad_data::DataParallel::ALONE,
    };
    (model, Loader::new(Arc::new(ex), opts).unwrap())
}

/// One run of [`setup`]: its model, optimizer and loader.
pub type Run<'a> = (&'a mut Model<B>, &'a mut Optimizer<B>, &'a mut Loader);

/// Three steps (learning rate 1e-2 / (step + 1)) of two runs over equal loaders; both must
/// apply the update with the same loss bits. `check` gets each step's number, both outcomes
/// and whether the weights are the same bits.
pub fn three_steps(
    b: &B,
    (a, d): (Run, Run),
    what: &str,
    mut check: impl FnMut(usize, StepOutcome, StepOutcome, bool),
) {
    for step in 0..3 {
        let lr = 1e-2 / (step + 1) as f64;
        let one = |(model, opt, loader): &mut Run| {
            let s = loader.next().unwrap();
            train_step(b, &SingleProcess, model, opt, &s.batches, lr).unwrap()
        };
        let (mut a, mut d) = (
            (&mut *a.0, &mut *a.1, &mut *a.2),
            (&mut *d.0, &mut *d.1, &mut *d.2),
        );
        let (oa, od) = (one(&mut a), one(&mut d));
        assert!(oa.applied && od.applied, "{what}");
        assert_eq!(oa.loss.to_bits(), od.loss.to_bits(), "{what} step {step}");
        let same = a.0.params.len() == d.0.params.len()
            && a.0
                .params
                .iter()
                .zip(d.0.params.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits());
        check(step, oa, od, same);
    }
}
