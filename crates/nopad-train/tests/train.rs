//! End-to-end behaviour of the training loop on the CPU backend: loss falls, runs are
//! deterministic, strategies agree, evaluation does not depend on how it is batched.

use std::sync::Arc;

use nopad_backend::cpu::Cpu;
use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::{pack_micro_batch, Example, Loader, LoaderOptions, PackOptions, Strategy};
use nopad_train::{build_model, train_step, SingleProcess};
use nopad_train::{
    evaluate, train, AdamWConfig, MasterPrecision, ModelSource, Optimizer, StatePrecision,
    TrainConfig,
};

mod common;

fn tiny_config(steps: u64) -> TrainConfig {
    common::tiny_run(steps, 256, 64, 8, 2)
}

/// Trains `tc` for 40 steps; the loss must fall. Returns the losses.
fn loss_falls(name: &str, tc: &TrainConfig) -> Vec<f64> {
    let b = Cpu::<f32>::new();
    let mut losses = Vec::new();
    let s = train(&b, tc, |r| losses.push(r.loss)).unwrap();
    assert_eq!(losses.len(), 40, "{name}");
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[35..].iter().sum::<f64>() / 5.0;
    assert!(
        last < first - 0.3,
        "{name}: loss did not fall: first {first:.3}, last {last:.3}"
    );
    assert!(s.tokens_per_s > 0.0 && s.real_tokens > 0 && s.pad_tokens == 0);
    losses
}

#[test]
fn a_short_run_on_the_tiny_preset_lowers_the_loss() {
    loss_falls("default", &tiny_config(40));
}

/// Every optimizer-state mode trains, and each is really another computation than the
/// default (its losses part from the fp32 ones after the first update).
#[test]
fn every_optimizer_state_mode_lowers_the_loss() {
    let reference = loss_falls("default", &tiny_config(40));
    for (states, master) in [
        (StatePrecision::Bf16, MasterPrecision::F32),
        (StatePrecision::Block8, MasterPrecision::F32),
        (StatePrecision::F32, MasterPrecision::None),
        (StatePrecision::Block8, MasterPrecision::None),
    ] {
        let mut tc = tiny_config(40);
        tc.adamw.states = states;
        tc.adamw.master = master;
        let name = format!("{states:?} moments, {master:?} master");
        let losses = loss_falls(&name, &tc);
        assert_eq!(losses[0].to_bits(), reference[0].to_bits(), "{name}");
        assert_ne!(
            losses[1..],
            reference[1..],
            "{name}: same losses as fp32 AdamW"
        );
    }
}

#[test]
fn runs_with_the_same_seed_are_bit_identical() {
    let b = Cpu::<f32>::new();
    let run = |seed| {
        let mut c = tiny_config(6);
        c.seed = seed;
        let mut v = Vec::new();
        train(&b, &c, |r| {
            v.push((r.loss.to_bits(), r.grad_norm.to_bits()))
        })
        .unwrap();
        v
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}

fn examples() -> Vec<Example> {
    instruction_dataset(&SyntheticConfig {
        n_examples: 48,
        vocab_size: 97,
        lengths: LengthDist::FlanLike,
        max_len: 40,
        seed: 1,
    })
}

fn pack(strategy: Strategy, batch_size: usize) -> PackOptions {
    PackOptions {
        strategy,
        batch_size,
        max_len: 40,
        pad_token_id: 0,
        group_by_length: false,
    }
}

#[test]
fn pad_and_flatten_steps_train_identically() {
    // The same examples per step through the real packers: losses and weights after several
    // updates agree to f32 rounding, step by step.
    let b = Cpu::<f32>::new();
    let ex = Arc::new(examples());
    let mut results = Vec::new();
    for strategy in [Strategy::Pad, Strategy::Flatten] {
        let (mut model, _) = build_model(&b, &ModelSource::Preset("tiny".into()), 7).unwrap();
        let mut opt = Optimizer::new(&b, &model, AdamWConfig::default()).unwrap();
        let opts = LoaderOptions {
            pack: pack(strategy, 4),
            grad_accum: 2,
            seed: 5,
            shuffle: true,
            start: Default::default(),
            prefetch: 2,
            parallel: nopad_data::DataParallel::ALONE,
        };
        let mut loader = Loader::new(ex.clone(), opts).unwrap();
        let mut losses = Vec::new();
        for _ in 0..4 {
            let step = loader.next().unwrap();
            losses.push(
                train_step(
                    &b,
                    &SingleProcess,
                    &mut model,
                    &mut opt,
                    &step.batches,
                    1e-3,
                )
                .unwrap()
                .loss,
            );
        }
        results.push((losses, model.params.to_vec()));
    }
    let (lp, wp) = &results[0];
    let (lf, wf) = &results[1];
    for (a, c) in lp.iter().zip(lf) {
        assert!((a - c).abs() / a <= 1e-5, "pad {a} vs flatten {c}");
    }
    let diff = wp
        .iter()
        .zip(wf)
        .map(|(a, c)| (a - c).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-5, "weights drifted apart by {diff}");
}

#[test]
fn evaluation_does_not_depend_on_strategy_or_batch_size() {
    let b = Cpu::<f32>::new();
    let (mut model, _) = build_model(&b, &ModelSource::Preset("tiny".into()), 9).unwrap();
    let ex = examples();
    let base = evaluate(&b, &mut model, &ex, &pack(Strategy::Flatten, 48)).unwrap();
    assert!(base.tokens > 0 && base.loss.is_finite());
    for (s, bs) in [
        (Strategy::Pad, 1),
        (Strategy::Pad, 7),
        (Strategy::Flatten, 1),
        (Strategy::Flatten, 5),
    ] {
        let r = evaluate(&b, &mut model, &ex, &pack(s, bs)).unwrap();
        assert_eq!(r.tokens, base.tokens);
        assert!(
            ((r.loss - base.loss) / base.loss).abs() <= 1e-5,
            "{s} x{bs}: {} vs {}",
            r.loss,
            base.loss
        );
    }
    // A single packed micro-batch gives the same loss as the whole evaluation.
    let refs: Vec<&Example> = ex.iter().collect();
    let batch = pack_micro_batch(&refs, &pack(Strategy::Flatten, 48));
    model
        .forward_eval(&b, &nopad_train::inputs(&batch))
        .unwrap();
    let loss = model.take_loss_sum(&b).unwrap() / batch.stats.target_tokens as f64;
    assert!(((loss - base.loss) / base.loss).abs() <= 1e-6);
}

#[test]
fn held_out_data_keeps_long_examples_even_under_long_drop() {
    let dir = tempfile::tempdir().unwrap();
    let eval = dir.path().join("eval.jsonl");
    // One short example and one longer than max-len 64: 9 + 99 targets.
    let short: Vec<i32> = (1..=10).collect();
    let long: Vec<i32> = (1..=100).map(|i| i % 90 + 1).collect();
    std::fs::write(
        &eval,
        format!(
            "{}\n{}\n",
            serde_json::json!({"input_ids": short}),
            serde_json::json!({"input_ids": long})
        ),
    )
    .unwrap();
    let b = Cpu::<f32>::new();
    let mut c = tiny_config(2);
    c.long = nopad_data::LongPolicy::Drop;
    c.eval_data = Some(eval);
    let s = train(&b, &c, |_| {}).unwrap();
    // Split into 64 + 36 tokens: 9 + 63 + 35 targets; nothing dropped.
    assert_eq!(s.eval_tokens, Some(9 + 63 + 35), "{:?}", s.eval_tokens);
}
