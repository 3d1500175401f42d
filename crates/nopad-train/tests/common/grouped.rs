//! A model for tests that update group by group: every parameter range on a block of 256, so
//! 8-bit moments can be updated one group at a time.

use nopad_backend::cpu::Cpu;
use nopad_data::Loader;
use nopad_model::Model;
use nopad_train::{train_step, Optimizer, SingleProcess, StepOutcome};

type B = Cpu<f32>;

/// A two-layer model whose every parameter range lies on a block of 256 (8-bit moments can be
/// updated group by group), tied or not, and a loader of one micro-batch a step.
pub fn setup(b: &B, tied: bool) -> (Model<B>, Loader) {
    let cfg = crate::common::block_aligned_config(tied);
    let mut model = Model::new(b, cfg.clone()).unwrap();
    let layout = model.layout.clone();
    nopad_model::weights::init_random(&cfg, &layout, 7, |o, v| model.write_params(b, o, v))
        .unwrap();
    let loader = crate::common::flatten_loader(cfg.vocab_size, 32, 1);
    (model, loader)
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
