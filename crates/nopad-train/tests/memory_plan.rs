//! The memory plan against the CPU backend's measured peak: after real steps of the tiny and
//! small presets in several modes, full fine-tuning and LoRA, `Backend::peak_memory` equals the
//! plan's peak exactly (the CPU counts every buffer's exact bytes and nothing else, so there is
//! no margin to allow).

use std::sync::Arc;

use nopad_backend::cpu::Cpu;
use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::{Loader, LoaderOptions, PackOptions, Strategy};
use nopad_model::lora::memory::LoraShape;
use nopad_model::lora::{LoraConfig, Target};
use nopad_model::quant::BaseDtype;
use nopad_model::Recompute;
use nopad_train::{
    build_lora_model, build_model, check_fits, plan, train_step, AdamWConfig, DeviceSizes,
    LoraTrain, MasterPrecision, ModelSource, Modes, Optimizer, SingleProcess, StatePrecision,
    Trained,
};

/// Trains three steps of `preset` in `modes` (LoRA adapters as `lora` says, when given) on a
/// fresh backend; returns the plan's peak at the largest micro-batch the steps saw and the
/// measured peak.
fn planned_and_measured<B: nopad_backend::Backend>(
    b: &B,
    preset: &str,
    modes: Modes,
    grad_accum: usize,
    lora: Option<&LoraTrain>,
) -> (usize, usize) {
    let source = ModelSource::Preset(preset.into());
    let (mut model, _) = match lora {
        Some(lt) => build_lora_model(b, &source, 1, None, lt).unwrap(),
        None => build_model(b, &source, 1).unwrap(),
    };
    model.set_recompute(modes.recompute);
    model.set_grad_aliasing(b, modes.grad_aliasing).unwrap();
    model
        .set_update_in_backward(b, modes.optim_in_backward)
        .unwrap();
    let ex = instruction_dataset(&SyntheticConfig {
        n_examples: 64,
        vocab_size: model.cfg.vocab_size,
        lengths: LengthDist::FlanLike,
        max_len: 64,
        seed: 3,
    });
    let mut loader = Loader::new(
        Arc::new(ex),
        LoaderOptions {
            pack: PackOptions {
                strategy: Strategy::Flatten,
                batch_size: 4,
                max_len: 64,
                pad_token_id: 0,
                group_by_length: false,
            },
            grad_accum,
            seed: 2,
            shuffle: true,
            start: Default::default(),
            prefetch: 1,
            parallel: nopad_data::DataParallel::ALONE,
        },
    )
    .unwrap();
    let cfg = AdamWConfig {
        states: modes.states,
        master: modes.master,
        max_grad_norm: if modes.optim_in_backward {
            None
        } else {
            AdamWConfig::default().max_grad_norm
        },
        ..AdamWConfig::default()
    };
    let placement = if modes.offload {
        nopad_train::Placement::Host
    } else {
        nopad_train::Placement::Device
    };
    let mut opt = Optimizer::with_placement(b, &model, cfg, placement).unwrap();
    let mut largest = 0;
    for k in 0..3 {
        model.set_lora_step(k);
        let step = loader.next().unwrap();
        largest = step
            .batches
            .iter()
            .map(|x| x.tokens.len())
            .fold(largest, usize::max);
        train_step(b, &SingleProcess, &mut model, &mut opt, &step.batches, 1e-3).unwrap();
    }
    let p = plan(&model.cfg, largest, modes, &DeviceSizes::of(b));
    (p.peak(), b.peak_memory())
}

fn modes(states: StatePrecision, recompute: Recompute, grad_aliasing: bool) -> Modes {
    Modes {
        states,
        master: MasterPrecision::F32,
        recompute,
        grad_aliasing,
        optim_in_backward: false,
        offload: false,
        trained: Trained::Full,
    }
}

/// The optimizer in the backward: a one-group gradient scratch instead of `[P]` gradients.
fn in_backward(states: StatePrecision, recompute: Recompute) -> Modes {
    Modes {
        optim_in_backward: true,
        offload: false,
        ..modes(states, recompute, false)
    }
}

/// The optimizer's state on the host (`--offload optimizer`), updated in the backward.
fn offloaded(states: StatePrecision, recompute: Recompute) -> Modes {
    Modes {
        offload: true,
        ..in_backward(states, recompute)
    }
}

#[test]
fn the_plan_equals_the_cpu_peak_in_every_mode() {
    use Recompute as R;
    use StatePrecision as S;
    for (preset, m, accum) in [
        ("tiny", modes(S::F32, R::None, true), 1),
        ("tiny", modes(S::Bf16, R::Full, false), 2),
        ("tiny", modes(S::Block8, R::Mlp(None), true), 1),
        ("small", modes(S::F32, R::None, true), 1),
        ("small", modes(S::Block8, R::Full, false), 1),
        ("small", modes(S::Bf16, R::Mlp(Some(1)), false), 2),
        ("tiny", in_backward(S::F32, R::None), 1),
        ("small", in_backward(S::Block8, R::Full), 1),
        ("small", offloaded(S::F32, R::None), 1),
        ("small", offloaded(S::Bf16, R::Full), 1),
    ] {
        let (planned, measured) = planned_and_measured(&Cpu::<f32>::new(), preset, m, accum, None);
        assert_eq!(planned, measured, "{preset} {}", m.label());
    }
    // f64: every kind 8 bytes.
    let m = modes(S::F32, R::None, false);
    let (planned, measured) = planned_and_measured(&Cpu::<f64>::new(), "tiny", m, 1, None);
    assert_eq!(planned, measured);
}

/// A LoRA run's settings (seed 1) and its modes: gradients of the adapters only, never aliased.
fn lora(r: usize, targets: &[Target], dropout: f32, states: StatePrecision) -> (Modes, LoraTrain) {
    let lt = LoraTrain {
        settings: LoraConfig {
            r,
            alpha: 16.0,
            dropout,
            targets: targets.to_vec(),
            use_rslora: false,
            seed: 1,
        },
        adapter: None,
        base: BaseDtype::Bf16,
    };
    let m = Modes {
        trained: Trained::Lora(LoraShape::of(&lt.settings, lt.base)),
        ..modes(states, Recompute::None, false)
    };
    (m, lt)
}

/// The same over an NF4 base (QLoRA).
fn qlora((m, mut lt): (Modes, LoraTrain)) -> (Modes, LoraTrain) {
    lt.base = BaseDtype::Nf4;
    let trained = Trained::Lora(LoraShape::of(&lt.settings, lt.base));
    (Modes { trained, ..m }, lt)
}

#[test]
fn the_plan_equals_the_cpu_peak_of_lora_runs() {
    use StatePrecision as S;
    use Target as T;
    let all = T::ALL;
    for (preset, (m, lt), recompute, accum) in [
        ("tiny", lora(4, &all, 0.0, S::F32), Recompute::None, 1),
        (
            "tiny",
            lora(2, &[T::Q, T::V], 0.1, S::Bf16),
            Recompute::Full,
            2,
        ),
        (
            "small",
            lora(8, &all, 0.05, S::Block8),
            Recompute::Mlp(None),
            1,
        ),
        (
            "small",
            lora(16, &[T::O, T::Down], 0.0, S::F32),
            Recompute::None,
            2,
        ),
        (
            "tiny",
            qlora(lora(4, &all, 0.1, S::F32)),
            Recompute::None,
            1,
        ),
        (
            "small",
            qlora(lora(8, &all, 0.0, S::Block8)),
            Recompute::Full,
            2,
        ),
    ] {
        let m = Modes { recompute, ..m };
        let (planned, measured) =
            planned_and_measured(&Cpu::<f32>::new(), preset, m, accum, Some(&lt));
        assert_eq!(planned, measured, "{preset} {}", m.label());
    }
    for (m, lt) in [
        lora(4, &all, 0.1, S::F32),
        qlora(lora(2, &all, 0.0, S::Bf16)),
    ] {
        let (planned, measured) = planned_and_measured(&Cpu::<f64>::new(), "tiny", m, 1, Some(&lt));
        assert_eq!(planned, measured, "{}", m.label());
    }
}

#[test]
fn a_frozen_base_plans_no_base_states_and_nf4_weights_at_half_a_byte() {
    // (The plan of NF4 weights equals the CPU's measured peak above; here its CUDA sizes.)
    let cfg = nopad_model::Config::preset("llama-3.2-1b").unwrap();
    let dev = DeviceSizes::cuda_bf16(false);
    let full = plan(
        &cfg,
        8192,
        modes(StatePrecision::F32, Recompute::None, false),
        &dev,
    );
    let (m, lt) = lora(16, &Target::ALL, 0.0, StatePrecision::F32);
    let lora_plan = plan(&cfg, 8192, m, &dev);
    let adapters = nopad_model::lora::AdapterLayout::new(&cfg, &lt.settings).total;
    // Base weights as full fine-tuning holds them, plus the adapters in bf16.
    assert!(lora_plan.weights >= full.weights + 2 * adapters);
    assert!(lora_plan.weights < full.weights + 2 * adapters + 1024);
    // fp32 gradients, 2-byte master halves and fp32 moments of the adapters only.
    assert!(lora_plan.gradients >= 4 * adapters && lora_plan.gradients < 4 * adapters + 1024);
    assert!(lora_plan.master >= 2 * adapters && lora_plan.master < 2 * adapters + 1024);
    assert!(lora_plan.moments >= 8 * adapters && lora_plan.moments < 8 * adapters + 1024);
    assert!(lora_plan.activations > full.activations);
    // NF4: the projections at half a byte a weight plus a byte per 64 (the scale codes) and
    // the double quantisation's f32s, and a scratch the size of the largest fused matrix.
    let shapes = nopad_model::lora::memory::projection_shapes(&cfg);
    let per_layer: usize = shapes.iter().map(|&(r, c)| r * c).sum();
    let pq = cfg.num_hidden_layers * per_layer;
    let nf4 = plan(&cfg, 8192, qlora((m, lt)).0, &dev);
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let scratch = 2 * (2 * f * d);
    let want = lora_plan.weights - 2 * pq + pq / 2 + pq / 64 + scratch;
    let slack = 7 * cfg.num_hidden_layers * (3 * 512 + 4 * (pq / 64 / 256 + 2));
    assert!(
        nf4.weights >= want && nf4.weights <= want + slack,
        "{} {want}",
        nf4.weights
    );
    assert_eq!(nf4.activations, lora_plan.activations);
    assert!(
        nf4.modes.label().ends_with("lora-r16 nf4"),
        "{}",
        nf4.modes.label()
    );
}

#[test]
fn the_cuda_plan_of_llama_1b_has_the_documented_shape() {
    let cfg = nopad_model::Config::preset("llama-3.2-1b").unwrap();
    let dev = DeviceSizes::cuda_bf16(true);
    let m = modes(StatePrecision::F32, Recompute::None, true);
    let p = plan(&cfg, 8192, m, &dev);
    let params = nopad_model::Layout::new(&cfg).total;
    // bf16 weights, 2-byte master halves, fp32 moments: 2 + 2 + 8 bytes a parameter.
    assert!(p.weights >= 2 * params && p.weights < 2 * params + (1 << 20));
    assert!(p.master >= 2 * params && p.master < 2 * params + 1024);
    assert!(p.moments >= 8 * params && p.moments < 8 * params + 4096);
    // Aliasing: the gradients cost less than their P·2 bytes.
    assert!(p.gradients < 2 * params, "{p}");
    assert!(p.workspace > nopad_train::CUDA_BLAS_WORKSPACE);
    assert!(p.slack >= nopad_train::CUDA_CONTEXT_BYTES);
    // More tokens, more activations; full recomputation, fewer.
    let bigger = plan(&cfg, 16384, m, &dev);
    assert!(bigger.activations > p.activations);
    let full = plan(
        &cfg,
        8192,
        Modes {
            recompute: Recompute::Full,
            ..m
        },
        &dev,
    );
    assert!(full.activations < p.activations / 4);
}

#[test]
fn a_run_that_does_not_fit_is_refused_with_what_would() {
    let cfg = nopad_model::Config::preset("llama-3.2-1b").unwrap();
    let dev = DeviceSizes::cuda_bf16(true);
    let m = modes(StatePrecision::F32, Recompute::None, true);
    let fits = |tokens: usize, gib: usize| check_fits(&cfg, tokens, m, &dev, gib << 30, false);
    assert!(fits(8192, 80).is_ok());
    let err = fits(65536, 24).unwrap_err();
    assert!(err.contains("does not fit"), "{err}");
    assert!(err.contains("--recompute full"), "{err}");
    assert!(err.contains("micro-batches of up to"), "{err}");
    // The largest fitting micro-batch does fit, one more token does not.
    let t = nopad_train::largest_fitting(&cfg, m, &dev, 24 << 30).unwrap();
    assert!(plan(&cfg, t, m, &dev).needed() <= 24 << 30);
    assert!(plan(&cfg, t + 1, m, &dev).needed() > 24 << 30);
    // Not even the states fit in 4 GiB with fp32 moments.
    let err = fits(1024, 4).unwrap_err();
    assert!(err.contains("not even one token"), "{err}");
}

#[test]
fn the_largest_micro_batch_bounds_every_strategy() {
    use nopad_data::{Example, PackOptions, Strategy};
    let ex = |len: usize| Example {
        input_ids: vec![1; len],
        labels: vec![1; len],
    };
    let examples: Vec<Example> = [5, 30, 12, 7, 30, 2].into_iter().map(ex).collect();
    let pack = |strategy| PackOptions {
        strategy,
        batch_size: 3,
        max_len: 32,
        pad_token_id: 0,
        group_by_length: false,
    };
    use nopad_train::largest_micro_batch as largest;
    assert_eq!(largest(&examples, &pack(Strategy::Flatten)), 30 + 30 + 12);
    assert_eq!(largest(&examples, &pack(Strategy::Pad)), 3 * 30);
    assert_eq!(largest(&examples, &pack(Strategy::Concat)), 86);
    assert_eq!(largest(&examples[..2], &pack(Strategy::Offline)), 35);
    assert_eq!(nopad_train::parse_gib("0.5"), Ok(1 << 29));
    assert!(nopad_train::parse_gib("-1").is_err() && nopad_train::parse_gib("x").is_err());
}
