//! The memory plan against the CPU backend's measured peak: after real steps of the tiny and
//! small presets in several modes, full fine-tuning and LoRA, one rank or several as threads at
//! every ZeRO stage, `Backend::peak_memory` equals the plan's peak exactly (the CPU counts every
//! buffer's exact bytes and nothing else, so there is no margin to allow). Also the default
//! `--shard`: the lowest stage whose plan fits. (Over 600 lines: one harness serves the one-rank,
//! the N-rank and the default-stage tests, which split apart would each repeat it.)

use std::sync::Arc;
use std::thread;

use nopad_backend::cpu::Cpu;
use nopad_backend::{Backend, Device};
use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::{DataParallel, Loader, LoaderOptions, PackOptions, Strategy};
use nopad_model::lora::memory::LoraShape;
use nopad_model::lora::{LoraConfig, Target};
use nopad_model::quant::BaseDtype;
use nopad_model::{Model, Recompute};
use nopad_train::{
    build_lora_model, build_model, check_fits, plan, plan_rank, train_step, AdamWConfig,
    Collective, DeviceSizes, LoraTrain, MasterPrecision, ModelSource, Modes, Optimizer, Placement,
    ShardStage, SingleProcess, StatePrecision, ThreadGroup, Trained,
};

mod common;

/// The model a test trains: a preset, or a two-layer model whose ranges lie on blocks of 256
/// (8-bit moments shard only over such ranges).
#[derive(Clone, Copy, Debug)]
enum Net {
    Preset(&'static str),
    BlockAligned,
}

/// `net` (LoRA adapters as `lora` says, when given) on `b`, set up for `modes` as a session sets
/// it up: from stage 2 full fine-tuning keeps one group's gradient at a time.
fn build<B: Backend>(b: &B, net: Net, modes: Modes, lora: Option<&LoraTrain>) -> Model<B> {
    let mut model = match (net, lora) {
        (Net::Preset(p), Some(lt)) => {
            build_lora_model(b, &ModelSource::Preset(p.into()), 1, None, lt)
                .unwrap()
                .0
        }
        (Net::Preset(p), None) => build_model(b, &ModelSource::Preset(p.into()), 1).unwrap().0,
        (Net::BlockAligned, _) => {
            let cfg = common::block_aligned_config(false);
            let mut m = Model::new(b, cfg.clone()).unwrap();
            let layout = m.layout.clone();
            nopad_model::weights::init_random(&cfg, &layout, 1, |o, v| m.write_params(b, o, v))
                .unwrap();
            m
        }
    };
    model.set_recompute(modes.recompute);
    model.set_offload_activations(modes.offload_acts).unwrap();
    model.set_grad_aliasing(b, modes.grad_aliasing).unwrap();
    let scratch = modes.optim_in_backward || (modes.shard >= 2 && lora.is_none());
    model.set_update_in_backward(b, scratch).unwrap();
    model
}

/// The optimizer settings of `modes` (no clipping in the backward).
fn adamw(modes: Modes) -> AdamWConfig {
    AdamWConfig {
        states: modes.states,
        master: modes.master,
        max_grad_norm: if modes.optim_in_backward {
            None
        } else {
            AdamWConfig::default().max_grad_norm
        },
        ..AdamWConfig::default()
    }
}

/// Trains three steps of this rank's share (64 synthetic examples, `batch_size` to a
/// micro-batch); returns the tokens of the largest micro-batch it saw.
fn three_steps<B: Backend>(
    b: &B,
    coll: &dyn Collective<B>,
    (model, opt): (&mut Model<B>, &mut Optimizer<B>),
    (batch_size, grad_accum): (usize, usize),
    parallel: DataParallel,
) -> usize {
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
                batch_size,
                max_len: 64,
                pad_token_id: 0,
                group_by_length: false,
            },
            grad_accum,
            seed: 2,
            shuffle: true,
            start: Default::default(),
            prefetch: 1,
            parallel,
        },
    )
    .unwrap();
    let mut largest = 0;
    for k in 0..3 {
        model.set_lora_step(k);
        let step = loader.next().unwrap();
        largest = step
            .batches
            .iter()
            .map(|x| x.tokens.len())
            .fold(largest, usize::max);
        train_step(b, coll, model, opt, &step.batches, 1e-3).unwrap();
    }
    largest
}

/// Trains three steps of `preset` in `modes` (LoRA adapters as `lora` says, when given) on a
/// fresh backend; returns the plan's peak at the largest micro-batch the steps saw and the
/// measured peak.
fn planned_and_measured<B: Backend>(
    b: &B,
    preset: &'static str,
    modes: Modes,
    grad_accum: usize,
    lora: Option<&LoraTrain>,
) -> (usize, usize) {
    let mut model = build(b, Net::Preset(preset), modes, lora);
    let placement = if modes.offload {
        Placement::Host
    } else {
        Placement::Device
    };
    let mut opt = Optimizer::with_placement(b, &model, adamw(modes), placement).unwrap();
    let alone = DataParallel::ALONE;
    let at = (4, grad_accum);
    let largest = three_steps(b, &SingleProcess, (&mut model, &mut opt), at, alone);
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
        offload_acts: 0,
        trained: Trained::Full,
        ranks: 1,
        shard: 0,
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
        // Qwen3: the q/k norms' saved inputs and rstd in every layer's activations.
        ("tiny-qwen3", modes(S::F32, R::None, true), 1),
        ("tiny-qwen3", modes(S::Bf16, R::Full, false), 2),
        ("tiny-qwen3", in_backward(S::F32, R::Mlp(None)), 1),
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
        (
            "tiny-qwen3",
            qlora(lora(4, &all, 0.1, S::F32)),
            Recompute::Full,
            1,
        ),
    ] {
        let m = Modes { recompute, ..m };
        let (planned, measured) =
            planned_and_measured(&Cpu::<f32>::new(), preset, m, accum, Some(&lt));
        assert_eq!(planned, measured, "{preset} {}", m.label());
    }
    // Offloaded activations (the small preset's 4 layers: 3 offloaded, 1 of which makes the
    // round trip through the host, beside 1 recomputed): the ring buffers on the device, the
    // host's buffers not.
    for (offload_acts, recompute) in [(3, Recompute::Mlp(Some(1))), (4, Recompute::None)] {
        let (m, lt) = qlora(lora(8, &all, 0.0, S::F32));
        let m = Modes {
            recompute,
            offload_acts,
            ..m
        };
        let cpu = Cpu::<f32>::new();
        let (planned, measured) = planned_and_measured(&cpu, "small", m, 1, Some(&lt));
        assert_eq!(planned, measured, "{}", m.label());
        let m = Modes {
            trained: Trained::Full,
            ..m
        };
        let (planned, measured) = planned_and_measured(&cpu, "small", m, 2, None);
        assert_eq!(planned, measured, "{}", m.label());
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

/// Trains three steps of `net` in `modes` on `modes.ranks` ranks, threads over a
/// [`ThreadGroup`], each with its own CPU backend, model and optimizer share at stage
/// `modes.shard`; returns each rank's (plan at its own largest micro-batch, measured peak,
/// that micro-batch's tokens).
fn ranks_planned_and_measured(
    net: Net,
    modes: Modes,
    (batch_size, grad_accum): (usize, usize),
    lora: Option<&LoraTrain>,
) -> Vec<(nopad_train::Plan, usize, usize)> {
    let stage = ShardStage::ALL
        .into_iter()
        .find(|s| s.number() == modes.shard)
        .unwrap();
    thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(modes.ranks)
            .into_iter()
            .map(|coll| {
                s.spawn(move || {
                    let b = Cpu::<f32>::new();
                    let mut model = build(&b, net, modes, lora);
                    let mut opt = Optimizer::for_rank(
                        &b,
                        &model,
                        adamw(modes),
                        Placement::Device,
                        (&coll, stage),
                    )
                    .unwrap();
                    let rank = coll.rank();
                    let parallel = DataParallel {
                        ranks: modes.ranks,
                        rank,
                        attention_len: 6 * model.cfg.hidden_size as u64,
                    };
                    let at = (batch_size, grad_accum);
                    let t = three_steps(&b, &coll, (&mut model, &mut opt), at, parallel);
                    let dev = DeviceSizes::of(&b);
                    let planned = plan_rank(&model.cfg, t, modes, &dev, rank);
                    // The plan of a run is that of the largest share: rank 0's.
                    let run = plan(&model.cfg, t, modes, &dev);
                    assert_eq!(run, plan_rank(&model.cfg, t, modes, &dev, 0));
                    assert!(run.peak() >= planned.peak());
                    (planned, b.peak_memory(), t)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn sharded(m: Modes, ranks: usize, shard: u8) -> Modes {
    Modes { ranks, shard, ..m }
}

#[test]
fn each_ranks_peak_equals_the_plan_of_its_stage() {
    use Recompute as R;
    use StatePrecision as S;
    let (tiny, small, aligned) = (Net::Preset("tiny"), Net::Preset("small"), Net::BlockAligned);
    for (net, m, at) in [
        (tiny, sharded(modes(S::F32, R::None, true), 2, 0), (4, 1)),
        (tiny, sharded(modes(S::F32, R::None, true), 2, 1), (4, 1)),
        (small, sharded(modes(S::Bf16, R::Full, false), 3, 1), (4, 2)),
        (tiny, sharded(modes(S::F32, R::None, false), 2, 2), (4, 1)),
        (small, sharded(modes(S::Bf16, R::Full, false), 3, 2), (4, 2)),
        (small, sharded(modes(S::F32, R::None, false), 4, 2), (4, 1)),
        (
            aligned,
            sharded(modes(S::Block8, R::Mlp(None), true), 2, 1),
            (4, 1),
        ),
        (
            aligned,
            sharded(modes(S::Block8, R::None, false), 4, 2),
            (4, 2),
        ),
        (
            Net::Preset("tiny-qwen3"),
            sharded(modes(S::F32, R::None, false), 2, 2),
            (4, 1),
        ),
        // Eight ranks of one example each: the model's construction, with its full gradient
        // buffer, is the peak.
        (small, sharded(modes(S::F32, R::Full, false), 8, 2), (1, 1)),
    ] {
        let ranks = ranks_planned_and_measured(net, m, at, None);
        assert_eq!(ranks.len(), m.ranks);
        for (rank, (planned, measured, t)) in ranks.iter().enumerate() {
            let label = m.label();
            assert_eq!(
                planned.peak(),
                *measured,
                "{net:?} {label} rank {rank} at {t}"
            );
        }
        if m.ranks == 8 {
            assert!(ranks.iter().all(|(p, _, _)| p.peak() == p.construction));
        }
    }
    // LoRA: the adapters' state is what is sharded; their gradients stay whole beside the
    // stage-2 accumulator.
    for shard in [1, 2] {
        let (m, lt) = lora(4, &Target::ALL, 0.0, StatePrecision::F32);
        let m = sharded(m, 2, shard);
        for (rank, (planned, measured, _)) in ranks_planned_and_measured(tiny, m, (4, 1), Some(&lt))
            .into_iter()
            .enumerate()
        {
            assert_eq!(planned.peak(), measured, "{} rank {rank}", m.label());
        }
    }
}

/// Each stage divides what it shards: for the CUDA plan of Llama-3.1-8B on 8 ranks, stage 1
/// keeps 1/8 of the moments and master, stage 2 a one-group gradient scratch plus 1/8 of the
/// gradients, stage 3 1/8 of the weights plus two gathered layers and the ends.
#[test]
fn the_stages_divide_what_they_shard() {
    let cfg = nopad_model::Config::preset("llama-3.1-8b").unwrap();
    let dev = DeviceSizes::cuda_bf16(true);
    let params = nopad_model::Layout::new(&cfg).total;
    let base = sharded(modes(StatePrecision::F32, Recompute::Full, true), 8, 0);
    let at = |shard| plan(&cfg, 8192, Modes { shard, ..base }, &dev);
    let (s0, s1, s2, s3) = (at(0), at(1), at(2), at(3));
    let near = |got: usize, want: usize| got.abs_diff(want) < want / 1000 + (1 << 20);
    assert!(
        near(s0.moments, 8 * params) && near(s0.master, 2 * params),
        "{s0}"
    );
    assert!(
        near(s1.moments, params) && near(s1.master, params / 4),
        "{s1}"
    );
    assert_eq!((s1.weights, s1.gradients), (s0.weights, s0.gradients));
    // Stage 2: bf16 pieces of 1/8, beside a scratch of the embedding and one layer.
    let scratch = s2.gradients - 2 * params.div_ceil(8);
    assert!(scratch < 2 * params / 8, "{s2}");
    assert_eq!((s2.moments, s2.master), (s1.moments, s1.master));
    // Stage 3: 1/8 of the bf16 weights plus two layers, the embedding and the head.
    let layer = nopad_model::Layout::new(&cfg)
        .group(nopad_model::GroupKind::Layer(0))
        .unwrap()
        .len();
    let ends = 2 * cfg.vocab_size * cfg.hidden_size;
    assert!(
        near(s3.weights, 2 * (params / 8 + 2 * layer + ends)),
        "{s3}"
    );
    assert_eq!(s3.gradients, s2.gradients);
    assert!(s0.peak() > s1.peak() && s1.peak() > s2.peak() && s2.peak() > s3.peak());
    // The model's construction (the full gradient buffer the scratch replaces) is planned
    // where it is the larger: stage 2 of 8 ranks; stage 3's model never allocates it.
    assert!(s2.construction > 0 && s3.construction == 0);
    assert!(s2.peak() >= s2.construction);
}

/// One rank: stage 0 whatever `--shard` would be chosen; several: the lowest stage that fits,
/// an explicit stage that does not fit refused with the stages that would, and a budget no
/// stage fits refused naming every stage's need.
#[test]
fn the_default_shard_is_the_lowest_stage_that_fits() {
    let mut tc = common::tiny_run(2, 40, 48, 4, 0);
    tc.ranks = 2;
    tc.gpu_memory = Some(1 << 40);
    let run = |tc: &nopad_train::TrainConfig| nopad_train::train_threads::<f32>(tc, |_| {});
    let chosen = |s: &nopad_train::Summary| {
        s.notes
            .iter()
            .find(|n| n.starts_with("shard "))
            .cloned()
            .unwrap_or_else(|| panic!("no stage note in {:?}", s.notes))
    };
    let roomy = run(&tc).unwrap();
    let note = chosen(&roomy);
    assert!(note.starts_with("shard 0 chosen (2 ranks, "), "{note}");
    // The planned micro-batch, the largest of any rank's.
    let t: usize = note
        .split("largest micro-batch ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    let cfg = nopad_model::Config::preset("tiny").unwrap();
    let dev = DeviceSizes::of(&Cpu::<f32>::new());
    let needs = |shard| {
        plan(
            &cfg,
            t,
            Modes {
                shard,
                ..nopad_train::modes_of(&tc, 2)
            },
            &dev,
        )
    };
    let (s0, s1, s2) = (needs(0), needs(1), needs(2));
    // (Stage 2 of this tiny model needs about what stage 1 does: its one-group scratch is
    // about half the model.)
    assert!(s1.needed() < s0.needed(), "{s0}\n{s1}");
    tc.gpu_memory = Some((s0.needed() + s1.needed()) / 2);
    let tight = run(&tc).unwrap();
    let note = chosen(&tight);
    assert!(note.starts_with("shard 1 chosen"), "{note}");
    assert!(tight.peak_memory_bytes <= s1.peak(), "{note}");
    assert!(tight.peak_memory_bytes < roomy.peak_memory_bytes);
    // Asked for stage 0, the same budget is refused, naming stage 1.
    tc.shard = Some(ShardStage::Replicated);
    let e = run(&tc).unwrap_err().to_string();
    assert!(e.contains("ZeRO stages that fit"), "{e}");
    assert!(e.contains("--shard 1"), "{e}");
    // Below every stage's need, nothing fits.
    tc.shard = None;
    tc.gpu_memory = Some(s1.needed().min(s2.needed()) - 1);
    let e = run(&tc).unwrap_err().to_string();
    assert!(e.contains("no --shard stage fits"), "{e}");
    assert!(
        e.contains("stage 0 needs") && e.contains("stage 2 needs"),
        "{e}"
    );
    // One rank: no stage to choose, no note.
    tc.ranks = 1;
    tc.gpu_memory = Some(1 << 40);
    let alone = run(&tc).unwrap();
    assert!(
        alone.notes.iter().all(|n| !n.starts_with("shard ")),
        "{:?}",
        alone.notes
    );
}
