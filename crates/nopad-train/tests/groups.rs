//! Parameter groups on the CPU backend: an update of each group from the backward's hook equals
//! the update after the backward bit for bit, and a frozen group keeps its parameters.

use std::sync::Arc;

use nopad_backend::cpu::Cpu;
use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::{Batch, Loader, LoaderOptions, PackOptions, Strategy};
use nopad_model::{GroupKind, Model};
use nopad_train::{
    build_model, inputs, step_targets, train_step, AdamWConfig, GroupSettings, ModelSource,
    Optimizer, SingleProcess, TrainError,
};

type B = Cpu<f32>;

/// The tiny preset (untied head when `tied` is false) and a loader of one micro-batch a step.
fn setup(b: &B, tied: bool) -> (Model<B>, Loader) {
    let (mut model, _) = build_model(b, &ModelSource::Preset("tiny".into()), 5).unwrap();
    if !tied {
        // Re-initialise an untied copy of the preset so the head is a group of its own.
        let mut cfg = model.cfg.clone();
        cfg.tie_word_embeddings = false;
        model = Model::new(b, cfg.clone()).unwrap();
        let layout = model.layout.clone();
        nopad_model::weights::init_random(&cfg, &layout, 5, |o, v| model.write_params(b, o, v))
            .unwrap();
    }
    let ex = instruction_dataset(&SyntheticConfig {
        n_examples: 64,
        vocab_size: model.cfg.vocab_size,
        lengths: LengthDist::FlanLike,
        max_len: 48,
        seed: 9,
    });
    let opts = LoaderOptions {
        pack: PackOptions {
            strategy: Strategy::Flatten,
            batch_size: 4,
            max_len: 48,
            pad_token_id: 0,
            group_by_length: false,
        },
        grad_accum: 1,
        seed: 2,
        shuffle: true,
        start: Default::default(),
        prefetch: 1,
        parallel: nopad_data::DataParallel::ALONE,
    };
    (model, Loader::new(Arc::new(ex), opts).unwrap())
}

fn no_clip() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.1,
        max_grad_norm: None,
        ..AdamWConfig::default()
    }
}

fn forward(b: &B, model: &mut Model<B>, batches: &[Batch]) {
    let scale = 1.0 / step_targets::<B>(&SingleProcess, batches).unwrap() as f32;
    model.forward_train(b, &inputs(&batches[0]), scale).unwrap();
}

#[test]
fn updating_each_group_in_the_backward_equals_updating_after_it() {
    let b = B::new();
    for (tied, aliasing) in [(true, false), (false, false), (true, true), (false, true)] {
        let (mut after, mut loader_a) = setup(&b, tied);
        let (mut during, mut loader_d) = setup(&b, tied);
        for m in [&mut after, &mut during] {
            m.set_grad_aliasing(&b, aliasing).unwrap();
        }
        let mut opt_a = Optimizer::new(&b, &after, no_clip()).unwrap();
        let mut opt_d = Optimizer::new(&b, &during, no_clip()).unwrap();
        for step in 0..3 {
            let lr = 1e-2 / (step + 1) as f64;
            let s = loader_a.next().unwrap();
            assert_eq!(s.batches.len(), 1);
            forward(&b, &mut after, &s.batches);
            after.backward(&b).unwrap();
            let info = opt_a.update(&b, &SingleProcess, &mut after, lr).unwrap();
            assert!(info.applied);
            after.zero_grads(&b).unwrap();

            let s = loader_d.next().unwrap();
            forward(&b, &mut during, &s.batches);
            opt_d.begin_step();
            let mut seen = Vec::new();
            during
                .backward_with(&b, |g| {
                    seen.push(g.group.kind);
                    opt_d.update_group(&b, g, lr, 1.0)
                })
                .unwrap();
            during.zero_grads(&b).unwrap();
            let order: Vec<GroupKind> = during.layout.groups.iter().map(|g| g.kind).collect();
            assert_eq!(seen, order, "every group once, in backward order");
            let (pa, pd) = (after.params.to_vec(), during.params.to_vec());
            let same = pa.iter().zip(&pd).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "tied={tied} aliasing={aliasing} step {step}");
            assert_eq!(opt_a.step, opt_d.step);
        }
        let changed = after.params.to_vec() != setup(&b, tied).0.params.to_vec();
        assert!(changed, "the updates did something");
    }
}

#[test]
fn a_frozen_group_keeps_its_parameters_while_the_others_train() {
    let b = B::new();
    let (mut model, mut loader) = setup(&b, false);
    let before = model.params.to_vec();
    let mut opt = Optimizer::new(&b, &model, AdamWConfig::default()).unwrap();
    let frozen = GroupSettings {
        trainable: false,
        ..GroupSettings::default()
    };
    for kind in [GroupKind::Layer(0), GroupKind::Head] {
        opt.set_group(kind, frozen).unwrap();
    }
    let err = opt.set_group(GroupKind::Layer(99), frozen).unwrap_err();
    assert!(matches!(err, TrainError::Config(_)), "{err}");
    for _ in 0..3 {
        let s = loader.next().unwrap();
        let out = train_step(&b, &SingleProcess, &mut model, &mut opt, &s.batches, 1e-2).unwrap();
        assert!(out.applied && out.grad_norm > 0.0);
    }
    let after = model.params.to_vec();
    for g in &model.layout.groups {
        let kept = g
            .ranges()
            .all(|(r, _)| before[r.clone()].iter().zip(&after[r]).all(|(x, y)| x == y));
        let frozen = matches!(g.kind, GroupKind::Layer(0) | GroupKind::Head);
        assert_eq!(kept, frozen, "group {}", g.kind);
    }
}

#[test]
fn update_group_needs_a_step_number() {
    let b = B::new();
    let (mut model, mut loader) = setup(&b, true);
    let mut opt = Optimizer::new(&b, &model, no_clip()).unwrap();
    let s = loader.next().unwrap();
    forward(&b, &mut model, &s.batches);
    let err = model
        .backward_with(&b, |g| opt.update_group(&b, g, 1e-3, 1.0))
        .unwrap_err();
    assert!(err.to_string().contains("begin_step"), "{err}");
}
