//! Whole-model tests: finite-difference gradients of every parameter kind (f64), padded vs
//! flattened batches, gradient accumulation, attention isolation, and checkpoint round trips;
//! the Llama paths and Qwen3's q/k norms (`tiny_qwen3`). Over 600 lines: the helpers the LoRA,
//! QLoRA and sharding tests share live here with the tests that first need them.

use nopad_backend::cpu::{Cpu, Scalar};
use nopad_rng::Rng;

use crate::weights::{self, SaveDtype};
use crate::{Config, Inputs, Model, ModelError, Recompute};

#[path = "../tests/support/packed.rs"]
pub(crate) mod packed;
use packed::Packed;

mod window;

/// Examples as (tokens, labels); label -100 = not a target.
pub(crate) type Ex = (Vec<i32>, Vec<i32>);

fn shifted(labels: &[i32]) -> Vec<i32> {
    let mut t: Vec<i32> = labels[1..].to_vec();
    t.push(-100);
    t
}

pub(crate) fn flatten(exs: &[Ex]) -> Packed {
    let mut p = Packed::empty(0);
    for (tok, lab) in exs {
        p.tokens.extend(tok);
        p.targets.extend(shifted(lab));
        p.pos.extend(0..tok.len() as i32);
        p.cu.push(p.tokens.len() as i32);
        p.max = p.max.max(tok.len());
    }
    p
}

pub(crate) fn pad(exs: &[Ex], pad_id: i32) -> Packed {
    let m = exs.iter().map(|e| e.0.len()).max().unwrap();
    let mut p = Packed::empty(m);
    for (tok, lab) in exs {
        let extra = m - tok.len();
        p.tokens.extend(
            tok.iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, extra)),
        );
        p.targets.extend(
            shifted(lab)
                .into_iter()
                .chain(std::iter::repeat_n(-100, extra)),
        );
        p.pos.extend(0..m as i32);
        p.cu.push(p.tokens.len() as i32);
    }
    p
}

/// Concatenation without isolation: one segment, continuing positions, targets crossing.
fn concat(exs: &[Ex]) -> Packed {
    let tokens: Vec<i32> = exs.iter().flat_map(|e| e.0.clone()).collect();
    let labels: Vec<i32> = exs.iter().flat_map(|e| e.1.clone()).collect();
    let n = tokens.len();
    Packed {
        targets: shifted(&labels),
        pos: (0..n as i32).collect(),
        cu: vec![0, n as i32],
        max: n,
        tokens,
    }
}

pub(crate) fn examples(rng: &mut Rng, lens: &[usize], vocab: usize) -> Vec<Ex> {
    lens.iter()
        .map(|&l| {
            let tok: Vec<i32> = (0..l)
                .map(|_| 1 + rng.below(vocab as u64 - 1) as i32)
                .collect();
            // Mask a "prompt" of about a third.
            let lab = tok
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < l / 3 { -100 } else { t })
                .collect();
            (tok, lab)
        })
        .collect()
}

pub(crate) fn tiny(tied: bool, bias: bool) -> Config {
    let mut c = Config::preset("tiny").unwrap();
    c.tie_word_embeddings = tied;
    c.qkv_bias = bias;
    c.o_bias = bias;
    c
}

/// The Qwen3 counterpart of [`tiny`]: q/k norms, and heads of 8 with D = 16 and 4 heads, so
/// attention is wider than the residual stream (q_proj 16 → 32, o_proj 32 → 16).
pub(crate) fn tiny_qwen3(tied: bool, bias: bool) -> Config {
    let mut c = Config::preset("tiny-qwen3").unwrap();
    c.tie_word_embeddings = tied;
    c.qkv_bias = bias;
    c.o_bias = bias;
    c
}

fn model<T: Scalar>(b: &Cpu<T>, cfg: Config, seed: u64) -> Model<Cpu<T>> {
    let mut m = Model::new(b, cfg.clone()).unwrap();
    init_base(b, &mut m, cfg, seed);
    m
}

/// Fills a model's parameters as [`model`] does (also the frozen base of a LoRA model).
pub(crate) fn init_base<T: Scalar>(b: &Cpu<T>, m: &mut Model<Cpu<T>>, cfg: Config, seed: u64) {
    let layout = m.layout.clone();
    // A larger init than HF's 0.02 so every path carries gradient well above rounding; biases
    // and norms get random values too, so their gradients are not special cases.
    let mut cfg = cfg;
    cfg.initializer_range = 0.3;
    weights::init_random(&cfg, &layout, seed, |off, v| m.write_params(b, off, v)).unwrap();
    let mut rng = Rng::new(seed ^ 99);
    for r in layout.norm_ranges().into_iter().chain(layout.bias_ranges()) {
        let v: Vec<f32> = r.clone().map(|_| 1.0 + 0.3 * rng.normal() as f32).collect();
        m.write_params(b, r.start, &v).unwrap();
    }
}

/// A model of `cfg` initialised from `seed`, and examples of `lens` drawn from `seed + 1`.
fn model_and_examples(
    b: &Cpu<f32>,
    cfg: Config,
    seed: u64,
    lens: &[usize],
) -> (Model<Cpu<f32>>, Vec<Ex>) {
    let exs = examples(&mut Rng::new(seed + 1), lens, cfg.vocab_size);
    (model(b, cfg, seed), exs)
}

/// Rows of a batch that carry a target.
pub(crate) fn n_targets(p: &Packed) -> usize {
    p.targets.iter().filter(|&&t| t != -100).count()
}

pub(crate) fn loss_and_grads<T: Scalar>(
    b: &Cpu<T>,
    m: &mut Model<Cpu<T>>,
    batches: &[&Packed],
    scale: f32,
) -> (f64, Vec<f64>) {
    m.zero_grads(b).unwrap();
    for p in batches {
        m.forward_train(b, &p.inputs(), scale).unwrap();
        m.backward(b).unwrap();
    }
    let loss = m.take_loss_sum(b).unwrap();
    (
        loss,
        m.grads(b).unwrap().iter().map(|v| v.to_f64()).collect(),
    )
}

pub(crate) fn same_bits(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn a_step_overwrites_stale_gradients_and_aliasing_refuses_a_second_micro_batch() {
    use nopad_backend::Device;
    for tied in [false, true] {
        let cfg = tiny(tied, true);
        let mut rng = Rng::new(51);
        let p = flatten(&examples(&mut rng, &[7, 12, 3], cfg.vocab_size));
        let q = flatten(&examples(&mut rng, &[5, 9], cfg.vocab_size));
        let b = Cpu::<f32>::new();
        let mut m = model(&b, cfg.clone(), 52);
        let (l0, g0) = loss_and_grads(&b, &mut m, &[&p], 0.1);
        // What aliased activations leave in the buffer must not survive into a step.
        let total = m.layout.total;
        b.write(&mut m.grads, 0, &vec![f32::NAN; total]).unwrap();
        let (l1, g1) = loss_and_grads(&b, &mut m, &[&p], 0.1);
        assert!(l1 == l0 && same_bits(&g1, &g0), "tied={tied}");
        // Aliased: the same numbers (the CPU backend places every part on its own).
        m.zero_grads(&b).unwrap();
        m.set_grad_aliasing(&b, true).unwrap();
        let (l2, g2) = loss_and_grads(&b, &mut m, &[&p], 0.1);
        assert!(l2 == l0 && same_bits(&g2, &g0), "tied={tied}");
        // A second micro-batch, or any forward, would write over the gradients: refused.
        for train in [true, false] {
            let r = if train {
                m.forward_train(&b, &q.inputs(), 0.1)
            } else {
                m.forward_eval(&b, &q.inputs())
            };
            let err = r.unwrap_err().to_string();
            assert!(err.contains("aliasing"), "{err}");
        }
        assert!(
            m.set_grad_aliasing(&b, false).is_err(),
            "only between steps"
        );
        m.zero_grads(&b).unwrap();
        // Zeroed gradients read as zeros; a backward needs its forward.
        assert!(m.grads(&b).unwrap().iter().all(|&v| v == 0.0));
        assert!(m.backward(&b).is_err());
        m.forward_train(&b, &q.inputs(), 0.1).unwrap();
        assert!(
            m.grads(&b).is_err(),
            "incomplete while the backward is pending"
        );
        assert!(m.forward_train(&b, &p.inputs(), 0.1).is_err());
        m.backward(&b).unwrap();
        // Without aliasing, two micro-batches add up.
        m.zero_grads(&b).unwrap();
        m.set_grad_aliasing(&b, false).unwrap();
        let (_, gq) = loss_and_grads(&b, &mut m, &[&q], 0.1);
        let (_, gpq) = loss_and_grads(&b, &mut m, &[&p, &q], 0.1);
        for ((s, a), c) in gpq.iter().zip(&g0).zip(&gq) {
            assert!(
                (s - (a + c)).abs() <= 1e-5 * (1.0 + s.abs()),
                "{s} vs {a} + {c}"
            );
        }
    }
}

#[test]
fn finite_differences_for_every_parameter_kind_and_the_input_path() {
    let qwen3 = [tiny_qwen3(false, true), tiny_qwen3(true, false)];
    for cfg in [tiny(false, true), tiny(true, false)]
        .into_iter()
        .chain(qwen3)
    {
        let b = Cpu::<f64>::new();
        let tied = cfg.tie_word_embeddings;
        let mut m = model(&b, cfg.clone(), 5);
        let mut rng = Rng::new(6);
        let exs = examples(&mut rng, &[5, 1, 7, 3], cfg.vocab_size);
        let p = flatten(&exs);
        let (_, grads) = loss_and_grads(&b, &mut m, &[&p], 1.0);
        let eval = |m: &mut Model<Cpu<f64>>| {
            m.forward_eval(&b, &p.inputs()).unwrap();
            m.take_loss_sum(&b).unwrap()
        };
        let h = 1e-5;
        let tensors = m.layout.tensors.clone();
        let scale = grads.iter().fold(0.0f64, |a, g| a.max(g.abs()));
        for t in &tensors {
            // A few random elements of every tensor (the whole embedding row of a used token too).
            let mut idx: Vec<usize> = (0..4)
                .map(|_| t.offset + rng.below(t.len() as u64) as usize)
                .collect();
            if t.name.contains("embed") {
                idx.push(t.offset + p.tokens[2] as usize * cfg.hidden_size + 3);
            }
            for i in idx {
                let orig = m.params[i];
                m.params[i] = orig + h;
                let lp = eval(&mut m);
                m.params[i] = orig - h;
                let lm = eval(&mut m);
                m.params[i] = orig;
                let what = format!(
                    "{} ({:?}, tied {tied}): element {}",
                    t.name,
                    cfg.arch,
                    i - t.offset
                );
                assert_fd(&what, (lp, lm, h), grads[i], scale);
            }
        }
        // Input path: ∂loss/∂x0 for a token that occurs once equals its embedding row gradient.
        let input_grad = m.input_grad(&b, p.tokens.len()).unwrap();
        let d = cfg.hidden_size;
        for (t, &tok) in p.tokens.iter().enumerate() {
            if p.tokens.iter().filter(|&&x| x == tok).count() == 1 && !tied {
                let row = &grads[m.layout.embed.start + tok as usize * d..][..d];
                for e in 0..d {
                    assert!((input_grad[t * d + e] as f64 - row[e]).abs() <= 1e-6 * scale.max(1.0));
                }
            }
        }
    }
}

/// Checks the central difference `(lp − lm) / 2h` against `analytic`, relative to `scale` (the
/// largest gradient), to 1e-6.
pub(crate) fn assert_fd(what: &str, (lp, lm, h): (f64, f64, f64), analytic: f64, scale: f64) {
    let num = (lp - lm) / (2.0 * h);
    let err = (num - analytic).abs() / scale;
    assert!(err < 1e-6, "{what}: numeric {num:e}, analytic {analytic:e}");
}

pub(crate) fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

#[test]
fn padded_and_flattened_batches_give_the_same_loss_and_gradients() {
    let b = Cpu::<f32>::new();
    let (mut m, exs) = model_and_examples(&b, tiny(false, true), 7, &[9, 2, 17, 5, 1, 12]);
    let f = flatten(&exs);
    let pd = pad(&exs, 0);
    let targets = n_targets(&f);
    assert_eq!(targets, n_targets(&pd));
    let scale = 1.0 / targets as f32;
    let (lf, gf) = loss_and_grads(&b, &mut m, &[&f], scale);
    let (lp, gp) = loss_and_grads(&b, &mut m, &[&pd], scale);
    assert!(
        ((lf - lp) / lf).abs() <= 1e-5,
        "loss: flatten {lf}, pad {lp}"
    );
    let r = rel_diff(&gp, &gf);
    assert!(r <= 1e-5, "gradients differ: relative {r:e}");
    // Per tensor too, so a small tensor cannot hide behind a large one.
    for t in &m.layout.tensors {
        let r = rel_diff(&gp[t.range()], &gf[t.range()]);
        assert!(r <= 1e-5, "{}: relative {r:e}", t.name);
    }
}

#[test]
fn gradient_accumulation_equals_one_batch_of_the_same_examples() {
    let b = Cpu::<f32>::new();
    let (mut m, exs) = model_and_examples(&b, tiny(true, false), 9, &[6, 11, 3, 8, 14, 2, 7]);
    let whole = flatten(&exs);
    let parts = [flatten(&exs[..2]), flatten(&exs[2..3]), flatten(&exs[3..])];
    let targets = n_targets(&whole);
    let scale = 1.0 / targets as f32;
    let (l1, g1) = loss_and_grads(&b, &mut m, &[&whole], scale);
    let (l2, g2) = loss_and_grads(&b, &mut m, &parts.iter().collect::<Vec<_>>(), scale);
    assert!(((l1 - l2) / l1).abs() <= 1e-5, "loss {l1} vs {l2}");
    let r = rel_diff(&g2, &g1);
    assert!(r <= 1e-5, "relative {r:e}");
}

#[test]
fn attention_that_crosses_examples_changes_the_loss() {
    let b = Cpu::<f32>::new();
    let (mut m, exs) = model_and_examples(&b, tiny(false, false), 11, &[8, 8, 8]);
    // Same tokens, same targets, same positions; only the attention boundaries differ.
    let iso = flatten(&exs);
    let mut leak = flatten(&exs);
    leak.cu = vec![0, 24];
    leak.max = 24;
    let eval = |m: &mut Model<Cpu<f32>>, p: &Packed| {
        m.forward_eval(&b, &p.inputs()).unwrap();
        m.take_loss_sum(&b).unwrap()
    };
    let (li, ll) = (eval(&mut m, &iso), eval(&mut m, &leak));
    assert!(
        ((li - ll) / li).abs() > 1e-3,
        "isolation made no difference: {li} vs {ll}"
    );
    // And the full concat variant (positions continue, labels cross) differs as well.
    let lc = eval(&mut m, &concat(&exs));
    assert!(((li - lc) / li).abs() > 1e-3, "{li} vs {lc}");
}

#[test]
fn checkpoints_roundtrip_bit_exactly_and_bad_ones_name_the_tensor() {
    let b = Cpu::<f32>::new();
    let dir = tempfile::tempdir().unwrap();
    for (cfg, dtype, shard) in [
        (tiny(false, true), SaveDtype::F32, usize::MAX),
        (tiny(true, false), SaveDtype::F32, 4096), // sharded, with an index
        (tiny(false, false), SaveDtype::Bf16, usize::MAX),
    ] {
        let path = dir.path().join(format!("m-{:?}-{shard}", dtype));
        let m = model(&b, cfg.clone(), 13);
        let mut src = m.params.clone();
        if dtype == SaveDtype::Bf16 {
            src.iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
        }
        weights::save_checkpoint(
            &path,
            &cfg,
            &m.layout,
            dtype,
            shard,
            |r| Ok(src[r].to_vec()),
        )
        .unwrap();
        assert_eq!(
            path.join("model.safetensors.index.json").exists(),
            shard != usize::MAX
        );
        let cfg2 = weights::read_config(&path).unwrap();
        let mut m2 = Model::new(&b, cfg2.clone()).unwrap();
        let layout = m2.layout.clone();
        weights::load_checkpoint(&path, &cfg2, &layout, |off, v| m2.write_params(&b, off, v))
            .unwrap();
        assert!(
            src.iter()
                .zip(m2.params.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "round trip is not bit-exact"
        );
        // Save again from the loaded model: the same bytes.
        let again = dir.path().join("again");
        weights::save_checkpoint(&again, &cfg2, &layout, dtype, shard, |r| {
            Ok(m2.params[r].to_vec())
        })
        .unwrap();
        for f in std::fs::read_dir(&path).unwrap() {
            let name = f.unwrap().file_name();
            assert_eq!(
                std::fs::read(path.join(&name)).unwrap(),
                std::fs::read(again.join(&name)).unwrap(),
                "{name:?}"
            );
        }
        std::fs::remove_dir_all(&again).unwrap();
    }
    // A checkpoint for another shape: the first mismatching tensor is named with both shapes.
    let path = dir.path().join("m-F32-18446744073709551615");
    let mut other = tiny(false, true);
    other.intermediate_size = 48;
    let layout = crate::Layout::new(&other);
    let err = weights::load_checkpoint(&path, &other, &layout, |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "tensor `model.layers.0.mlp.down_proj.weight`: shape [16, 40], expected [16, 48]"
        ),
        "{err}"
    );
    // Without biases in the config, the checkpoint's biases are unexpected.
    let nobias = tiny(false, false);
    let err = weights::load_checkpoint(&path, &nobias, &crate::Layout::new(&nobias), |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("self_attn.k_proj.bias`: unexpected tensor"),
        "{err}"
    );
    // A config with more layers than the checkpoint: a missing tensor.
    let mut deeper = tiny(false, true);
    deeper.num_hidden_layers = 3;
    let err = weights::load_checkpoint(&path, &deeper, &crate::Layout::new(&deeper), |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `model.layers.2.") && err.contains("missing from the checkpoint"),
        "{err}"
    );
}

#[test]
fn recomputing_activations_gives_identical_gradients_in_less_memory() {
    for cfg in [tiny(false, true), tiny_qwen3(false, true)] {
        recompute_gives_identical_gradients_in_less_memory(cfg);
    }
}

fn recompute_gives_identical_gradients_in_less_memory(mut cfg: Config) {
    use crate::Recompute;
    // Three layers, so that recomputing the MLP of two of them holds less than none (the one
    // recomputed gate/up buffer is shared) and more than all three.
    cfg.num_hidden_layers = 3;
    let mut rng = Rng::new(21);
    let exs = examples(&mut rng, &[9, 2, 17, 5], cfg.vocab_size);
    let p = flatten(&exs);
    let run = |mode: Recompute| {
        let b = Cpu::<f32>::new();
        let mut m = model(&b, cfg.clone(), 22);
        m.set_recompute(mode);
        let (loss, grads) = loss_and_grads(&b, &mut m, &[&p, &p], 0.01);
        let input = m.input_grad(&b, p.tokens.len()).unwrap();
        let acts = nopad_backend::Device::peak_memory(&b);
        (loss, grads, input, acts)
    };
    let (l0, g0, i0, mem0) = run(Recompute::None);
    let mut last_mem = mem0;
    for mode in [
        Recompute::Mlp(Some(2)),
        Recompute::Mlp(None),
        Recompute::Full,
    ] {
        let (l1, g1, i1, mem1) = run(mode);
        // The CPU backend is deterministic, so the recomputed activations are the same bits.
        assert_eq!(l0.to_bits(), l1.to_bits(), "{mode}");
        assert!(
            g0.iter().zip(&g1).all(|(a, b)| a.to_bits() == b.to_bits()),
            "gradients differ under recompute {mode}"
        );
        assert!(i0.iter().zip(&i1).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(
            mem1 < last_mem,
            "recompute {mode} should hold less memory: {mem1} vs {last_mem}"
        );
        last_mem = mem1;
    }
}

/// Offloading layers' gate/up projections to the host (alone and beside recomputation, over
/// enough layers that some projections travel both ways and some stay in the ring) gives the
/// same bits as keeping them, over two micro-batches, and holds less device memory; offloading
/// with full recomputation, or more layers than the model has, is refused.
#[test]
fn offloading_activations_gives_identical_gradients_in_less_memory() {
    use crate::Recompute;
    for mut cfg in [tiny(false, true), tiny_qwen3(false, true)] {
        cfg.num_hidden_layers = 6;
        let mut rng = Rng::new(23);
        let p = flatten(&examples(&mut rng, &[9, 2, 17, 5], cfg.vocab_size));
        let q = flatten(&examples(&mut rng, &[4, 11], cfg.vocab_size));
        let run = |mode: Recompute, offload: usize| {
            let b = Cpu::<f32>::new();
            let mut m = model(&b, cfg.clone(), 24);
            m.set_recompute(mode);
            m.set_offload_activations(offload).unwrap();
            let (loss, grads) = loss_and_grads(&b, &mut m, &[&p, &q], 0.01);
            m.forward_eval(&b, &p.inputs()).unwrap();
            let eval = m.take_loss_sum(&b).unwrap();
            (loss, grads, eval, nopad_backend::Device::peak_memory(&b))
        };
        let (l0, g0, e0, mem0) = run(Recompute::None, 0);
        for (mode, offload) in [
            (Recompute::None, 1),
            (Recompute::None, 3),
            (Recompute::None, 6),
            (Recompute::Mlp(Some(2)), 3),
            (Recompute::Mlp(None), 4),
        ] {
            let (l, g, e, mem) = run(mode, offload);
            let tag = format!("{mode} with {offload} offloaded");
            assert_eq!(l.to_bits(), l0.to_bits(), "{tag}");
            assert_eq!(e.to_bits(), e0.to_bits(), "{tag}");
            assert!(same_bits(&g, &g0), "gradients differ: {tag}");
            if offload > 2 {
                assert!(mem < mem0, "{tag}: {mem} vs {mem0}");
            }
        }
        let b = Cpu::<f32>::new();
        let mut m = model(&b, cfg.clone(), 24);
        assert!(m.set_offload_activations(7).is_err());
        m.set_recompute(Recompute::Full);
        assert!(m.set_offload_activations(1).is_err());
    }
}

#[test]
fn an_evaluation_model_holds_no_gradients_and_gives_the_same_loss() {
    let cfg = tiny(false, true);
    let mut rng = Rng::new(31);
    let exs = examples(&mut rng, &[9, 2, 17], cfg.vocab_size);
    let p = flatten(&exs);
    let loss_of = |eval: bool| {
        let b = Cpu::<f32>::new();
        let mut m = if eval {
            Model::new_eval(&b, cfg.clone()).unwrap()
        } else {
            Model::new(&b, cfg.clone()).unwrap()
        };
        let layout = m.layout.clone();
        crate::weights::init_random(&cfg, &layout, 3, |off, v| m.write_params(&b, off, v)).unwrap();
        m.forward_eval(&b, &p.inputs()).unwrap();
        let loss = m.take_loss_sum(&b).unwrap();
        if eval {
            let err = m
                .forward_train(&b, &p.inputs(), 1.0)
                .unwrap_err()
                .to_string();
            assert!(err.contains("evaluation"), "{err}");
            assert!(m.zero_grads(&b).is_err() && m.backward(&b).is_err());
        }
        (loss, nopad_backend::Device::peak_memory(&b))
    };
    let (l_train, mem_train) = loss_of(false);
    let (l_eval, mem_eval) = loss_of(true);
    assert_eq!(l_train.to_bits(), l_eval.to_bits());
    let params = crate::Layout::new(&cfg).total * 4;
    assert!(
        mem_eval + params <= mem_train,
        "{mem_eval} + {params} > {mem_train}"
    );
}

#[test]
fn changing_the_recompute_mode_between_steps_keeps_the_gradients() {
    use crate::Recompute;
    let cfg = tiny(false, true);
    let mut rng = Rng::new(41);
    let p = flatten(&examples(&mut rng, &[7, 12, 3], cfg.vocab_size));
    let b = Cpu::<f32>::new();
    let mut m = model(&b, cfg.clone(), 42);
    let (l0, g0) = loss_and_grads(&b, &mut m, &[&p], 0.1);
    for mode in [
        Recompute::Mlp(None),
        Recompute::None,
        Recompute::Full,
        Recompute::Mlp(Some(1)),
    ] {
        m.set_recompute(mode);
        let (l, g) = loss_and_grads(&b, &mut m, &[&p], 0.1);
        assert_eq!(l.to_bits(), l0.to_bits(), "{mode}");
        assert!(
            g.iter().zip(&g0).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{mode}"
        );
    }
}

#[test]
fn one_group_gradient_scratch_hands_each_group_the_full_buffers_gradient() {
    use nopad_backend::Device;
    for (cfg, recompute) in [
        (tiny(false, true), Recompute::None),
        (tiny(true, true), Recompute::Full),
        (tiny_qwen3(true, false), Recompute::None),
        (tiny_qwen3(false, true), Recompute::Full),
    ] {
        let tied = cfg.tie_word_embeddings;
        let mut rng = Rng::new(61);
        let p = flatten(&examples(&mut rng, &[9, 4, 13], cfg.vocab_size));
        let b = Cpu::<f32>::new();
        let mut m = model(&b, cfg.clone(), 62);
        m.set_recompute(recompute);
        let (l0, g0) = loss_and_grads(&b, &mut m, &[&p], 0.05);
        assert!(
            m.set_update_in_backward(&b, true).is_err(),
            "only between steps"
        );
        m.zero_grads(&b).unwrap();
        m.set_update_in_backward(&b, true).unwrap();
        assert!(m.set_grad_aliasing(&b, true).is_err(), "alternatives");
        // Stale values in the scratch must not leak into any group's gradient.
        let len = b.buf_len(&m.grads);
        assert!(len < m.layout.total, "{len} vs {}", m.layout.total);
        b.write(&mut m.grads, 0, &vec![f32::NAN; len]).unwrap();
        for _ in 0..2 {
            m.zero_grads(&b).unwrap();
            m.forward_train(&b, &p.inputs(), 0.05).unwrap();
            let mut seen = Vec::new();
            m.backward_with(&b, |g| {
                for (r, _) in g.group.ranges() {
                    let got = b.read(g.grads, g.grad_range(&r))?;
                    let want = &g0[r.clone()];
                    assert!(
                        got.iter()
                            .zip(want)
                            .all(|(x, y)| (*x as f64).to_bits() == y.to_bits()),
                        "tied={tied} group {} range {r:?}",
                        g.group.kind
                    );
                }
                seen.push(g.index);
                Ok::<(), ModelError>(())
            })
            .unwrap();
            assert_eq!(seen, (0..m.layout.groups.len()).collect::<Vec<_>>());
            assert_eq!(m.take_loss_sum(&b).unwrap(), l0);
            assert!(m.grads(&b).is_err(), "no full gradient is kept");
            assert!(m.forward_train(&b, &p.inputs(), 0.05).is_err());
        }
        m.zero_grads(&b).unwrap();
        m.set_update_in_backward(&b, false).unwrap();
        let (l1, g1) = loss_and_grads(&b, &mut m, &[&p], 0.05);
        assert!(l1 == l0 && same_bits(&g1, &g0));
    }
}
