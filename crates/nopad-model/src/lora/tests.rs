//! LoRA on the CPU: adapter gradients against f64 finite differences (every target, tied and
//! untied, with and without biases, with dropout), padded vs flattened batches, a fresh adapter
//! (B = 0) leaves the base model's loss, recomputation and accumulation change nothing, and the
//! base takes no gradient (also through an NF4 base: `tests_nf4.rs`).

use nopad_backend::cpu::{Cpu, Scalar};
use nopad_rng::Rng;

use super::{init_adapter, LoraConfig, Target};
use crate::quant::BaseDtype;
use crate::tests::packed::Packed;
use crate::tests::{
    assert_fd, examples, flatten, init_base, loss_and_grads, n_targets, pad, rel_diff, same_bits,
    tiny, tiny_qwen3,
};
use crate::{Config, Model, Recompute};

pub(super) fn lora_cfg(r: usize, dropout: f32, targets: &[Target]) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64 + 1.0,
        dropout,
        targets: targets.to_vec(),
        use_rslora: false,
        seed: 3,
    }
}

/// A LoRA model over the base of `crate::tests::model(cfg, seed)`, with PEFT's initialisation
/// and, with `random_b`, B drawn too (a fresh B = 0 would give A no gradient to check).
pub(super) fn lora_model<T: Scalar>(
    b: &Cpu<T>,
    cfg: Config,
    lora: LoraConfig,
    seed: u64,
    random_b: bool,
) -> Model<Cpu<T>> {
    lora_model_over(b, cfg, lora, seed, random_b, BaseDtype::Bf16)
}

/// [`lora_model`] over a base held as `base`.
pub(super) fn lora_model_over<T: Scalar>(
    b: &Cpu<T>,
    cfg: Config,
    lora: LoraConfig,
    seed: u64,
    random_b: bool,
    base: BaseDtype,
) -> Model<Cpu<T>> {
    let mut m = Model::new_lora_over(b, cfg.clone(), lora.clone(), base, true).unwrap();
    init_base(b, &mut m, cfg, seed);
    let layout = m.adapter_layout().unwrap().clone();
    init_adapter(&layout, lora.seed, |off, v| m.write_adapter(b, off, v)).unwrap();
    if random_b {
        let mut rng = Rng::new(seed ^ 7);
        for md in layout.layers.iter().flatten() {
            let v: Vec<f32> = md.b.clone().map(|_| 0.5 * rng.normal() as f32).collect();
            m.write_adapter(b, md.b.start, &v).unwrap();
        }
    }
    m
}

/// The training loss of one batch (with the dropout masks of a training pass), no gradient kept.
pub(super) fn train_loss<T: Scalar>(b: &Cpu<T>, m: &mut Model<Cpu<T>>, p: &Packed) -> f64 {
    m.zero_grads(b).unwrap();
    m.forward_train(b, &p.inputs(), 1.0).unwrap();
    m.zero_grads(b).unwrap();
    m.take_loss_sum(b).unwrap()
}

#[test]
fn adapter_gradients_match_finite_differences() {
    let (bf16, nf4) = (BaseDtype::Bf16, BaseDtype::Nf4);
    let cases = [
        (tiny(false, true), 0.0, Target::ALL.to_vec(), bf16),
        (tiny(true, false), 0.25, Target::ALL.to_vec(), bf16),
        (
            tiny(false, false),
            0.4,
            vec![Target::K, Target::O, Target::Up],
            bf16,
        ),
        // QLoRA: the same through an NF4 base.
        (tiny(false, true), 0.25, Target::ALL.to_vec(), nf4),
        // Qwen3: the q and k adapters feed the frozen q/k norms.
        (tiny_qwen3(true, false), 0.25, Target::ALL.to_vec(), bf16),
        (
            tiny_qwen3(false, true),
            0.0,
            vec![Target::Q, Target::K],
            nf4,
        ),
    ];
    for (cfg, drop, targets, base) in cases {
        let b = Cpu::<f64>::new();
        let (tied, bias) = (cfg.tie_word_embeddings, cfg.qkv_bias);
        let lc = lora_cfg(3, drop, &targets);
        let mut m = lora_model_over(&b, cfg.clone(), lc, 5, true, base);
        m.set_lora_step(11);
        let mut rng = Rng::new(6);
        let p = flatten(&examples(&mut rng, &[5, 1, 7, 3], cfg.vocab_size));
        let (_, grads) = loss_and_grads(&b, &mut m, &[&p], 1.0);
        let base_before = m.params.clone();
        let layout = m.adapter_layout().unwrap().clone();
        assert_eq!(grads.len(), layout.total, "the gradients are the adapters'");
        let scale = grads.iter().fold(0.0f64, |a, g| a.max(g.abs()));
        let h = 1e-5;
        for t in &layout.tensors {
            for _ in 0..3 {
                let i = t.offset + rng.below(t.len() as u64) as usize;
                let orig = m.trainable_mut()[i];
                let mut at = |v: f64| {
                    m.trainable_mut()[i] = v;
                    m.set_lora_step(11);
                    train_loss(&b, &mut m, &p)
                };
                let (lp, lm) = (at(orig + h), at(orig - h));
                m.trainable_mut()[i] = orig;
                let what = format!(
                    "{} ({:?}, tied {tied}, bias {bias}, dropout {drop}, {base:?}): {i}",
                    t.name, cfg.arch
                );
                assert_fd(&what, (lp, lm, h), grads[i], scale);
            }
        }
        assert!(
            same_bits(
                &m.params.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
                &base_before.iter().map(|v| v.to_f64()).collect::<Vec<_>>()
            ),
            "the frozen base changed"
        );
    }
}

#[test]
fn padded_and_flattened_batches_give_the_same_loss_and_adapter_gradients() {
    let b = Cpu::<f32>::new();
    let cfg = tiny(false, true);
    let mut m = lora_model(&b, cfg.clone(), lora_cfg(4, 0.0, &Target::ALL), 7, true);
    let exs = examples(&mut Rng::new(8), &[9, 2, 17, 5, 1, 12], cfg.vocab_size);
    let (f, pd) = (flatten(&exs), pad(&exs, 0));
    assert_eq!(n_targets(&f), n_targets(&pd));
    let scale = 1.0 / n_targets(&f) as f32;
    let (lf, gf) = loss_and_grads(&b, &mut m, &[&f], scale);
    let (lp, gp) = loss_and_grads(&b, &mut m, &[&pd], scale);
    assert!(
        ((lf - lp) / lf).abs() <= 1e-5,
        "loss: flatten {lf}, pad {lp}"
    );
    for t in &m.adapter_layout().unwrap().tensors {
        let r = rel_diff(&gp[t.range()], &gf[t.range()]);
        assert!(r <= 1e-5, "{}: relative {r:e}", t.name);
        assert!(
            gf[t.range()].iter().any(|&g| g != 0.0),
            "{}: no gradient",
            t.name
        );
    }
    // Two micro-batches add up to the whole batch.
    let parts = [flatten(&exs[..2]), flatten(&exs[2..])];
    let (l2, g2) = loss_and_grads(&b, &mut m, &[&parts[0], &parts[1]], scale);
    assert!(((lf - l2) / lf).abs() <= 1e-5, "loss {lf} vs {l2}");
    assert!(rel_diff(&g2, &gf) <= 1e-5);
}

#[test]
fn a_fresh_adapter_leaves_the_base_models_loss_and_the_base_takes_no_gradient() {
    for tied in [false, true] {
        let b = Cpu::<f32>::new();
        let cfg = tiny(tied, true);
        let mut base = Model::new(&b, cfg.clone()).unwrap();
        init_base(&b, &mut base, cfg.clone(), 9);
        let mut m = lora_model(&b, cfg.clone(), lora_cfg(2, 0.0, &Target::ALL), 9, false);
        let p = flatten(&examples(&mut Rng::new(10), &[6, 11, 3], cfg.vocab_size));
        let (lb, _) = loss_and_grads(&b, &mut base, &[&p], 0.1);
        let (ll, gl) = loss_and_grads(&b, &mut m, &[&p], 0.1);
        assert_eq!(
            lb.to_bits(),
            ll.to_bits(),
            "tied {tied}: B = 0 must add exactly nothing"
        );
        // B = 0: only B takes gradient (A's is du·x with du = dt·B = 0).
        let layout = m.adapter_layout().unwrap().clone();
        for md in layout.layers.iter().flatten() {
            assert!(gl[md.a.clone()].iter().all(|&g| g == 0.0));
            assert!(gl[md.b.clone()].iter().any(|&g| g != 0.0));
        }
        assert_eq!(m.trainable_len(), layout.total);
        assert_eq!(m.trainable_groups().len(), cfg.num_hidden_layers);
        let base_params = m.params.clone();
        let (params, grads) = m.params_and_grads(&b).unwrap();
        assert_eq!((params.len(), grads.len()), (layout.total, layout.total));
        assert!(same_bits(
            &m.params.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &base_params.iter().map(|&v| v as f64).collect::<Vec<_>>()
        ));
        // The full-model memory savers are refused; an evaluation LoRA model has no gradients.
        assert!(m.set_grad_aliasing(&b, true).is_err());
        assert!(m.set_update_in_backward(&b, true).is_err());
        let lora = m.lora().unwrap().clone();
        let mut e = Model::new_lora(&b, cfg.clone(), lora, false).unwrap();
        assert!(e.forward_train(&b, &p.inputs(), 1.0).is_err());
    }
}

#[test]
fn recomputation_and_dropout_masks_are_reproducible() {
    let b = Cpu::<f32>::new();
    let cfg = tiny(false, false);
    let mut m = lora_model(&b, cfg.clone(), lora_cfg(2, 0.3, &Target::ALL), 12, true);
    let p = flatten(&examples(&mut Rng::new(13), &[8, 5, 9], cfg.vocab_size));
    m.set_lora_step(4);
    let (l0, g0) = loss_and_grads(&b, &mut m, &[&p], 0.05);
    for mode in [
        Recompute::Full,
        Recompute::Mlp(None),
        Recompute::Mlp(Some(1)),
    ] {
        m.set_recompute(mode);
        m.set_lora_step(4);
        let (l, g) = loss_and_grads(&b, &mut m, &[&p], 0.05);
        assert!(l == l0 && same_bits(&g, &g0), "{mode}");
    }
    m.set_recompute(Recompute::None);
    // Offloaded activations come back the same bits (dropout regenerated in the backward).
    m.set_offload_activations(2).unwrap();
    m.set_lora_step(4);
    let (l, g) = loss_and_grads(&b, &mut m, &[&p], 0.05);
    assert!(l == l0 && same_bits(&g, &g0), "offloaded");
    m.set_offload_activations(0).unwrap();
    // Another step draws other masks, and so does the step's next micro-batch.
    m.set_lora_step(5);
    let (l5, _) = loss_and_grads(&b, &mut m, &[&p], 0.05);
    assert_ne!(l5, l0);
    m.set_lora_step(4);
    let (l4, _) = loss_and_grads(&b, &mut m, &[&p, &p], 0.05);
    assert!(
        l4 != 2.0 * l0 && (l4 - 2.0 * l0).abs() < 0.5 * l0,
        "{l4} vs 2 × {l0}"
    );
    // Evaluation drops nothing.
    m.forward_eval(&b, &p.inputs()).unwrap();
    let le = m.take_loss_sum(&b).unwrap();
    assert!(le != l0 && le != l5);
    let mut nodrop = lora_model(&b, cfg, lora_cfg(2, 0.0, &Target::ALL), 12, true);
    nodrop.forward_eval(&b, &p.inputs()).unwrap();
    assert_eq!(nodrop.take_loss_sum(&b).unwrap().to_bits(), le.to_bits());
}

#[test]
fn targets_parse_and_settings_are_checked() {
    assert_eq!(Target::parse_list("all-linear", "x").unwrap(), Target::ALL);
    assert_eq!(
        Target::parse_list("v_proj, q_proj,q_proj", "x").unwrap(),
        [Target::Q, Target::V]
    );
    let e = Target::parse_list("q_proj,qkv", "--lora-targets").unwrap_err();
    assert!(e.to_string().contains("--lora-targets") && e.to_string().contains("\"qkv\""));
    let mut c = lora_cfg(8, 0.0, &Target::ALL);
    c.alpha = 16.0;
    assert_eq!(c.scale(), 2.0);
    c.use_rslora = true;
    assert!((c.scale() - 16.0 / 8f32.sqrt()).abs() < 1e-6);
    for bad in [
        LoraConfig { r: 0, ..c.clone() },
        LoraConfig {
            dropout: 1.0,
            ..c.clone()
        },
        LoraConfig {
            alpha: -1.0,
            ..c.clone()
        },
        LoraConfig {
            targets: vec![],
            ..c.clone()
        },
    ] {
        assert!(bad.validate("flags").is_err(), "{bad:?}");
    }
}

#[test]
fn the_layout_uses_peft_names_and_shapes_and_init_is_pefts() {
    let cfg = tiny(false, false);
    let lora = lora_cfg(4, 0.0, &[Target::V, Target::Down]);
    let layout = super::AdapterLayout::new(&cfg, &lora);
    let names: Vec<(&str, &[usize])> = layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .take(4)
        .collect();
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    assert_eq!(
        names,
        [
            (
                "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
                &[4, d][..]
            ),
            (
                "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
                &[kv, 4][..]
            ),
            (
                "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
                &[4, f][..]
            ),
            (
                "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
                &[d, 4][..]
            ),
        ]
    );
    let mut vals = vec![f32::NAN; layout.total];
    init_adapter(&layout, 1, |off, v| {
        vals[off..off + v.len()].copy_from_slice(v);
        Ok(())
    })
    .unwrap();
    for md in layout.layers.iter().flatten() {
        let bound = 1.0 / (md.d_in as f32).sqrt();
        let a = &vals[md.a.clone()];
        assert!(a.iter().all(|v| v.abs() <= bound));
        assert!(
            a.iter().any(|v| v.abs() > 0.8 * bound),
            "uniform over the whole range"
        );
        assert!(vals[md.b.clone()].iter().all(|&v| v == 0.0));
    }
    // Groups: one per layer, top first, covering the buffer.
    let kinds: Vec<_> = layout.groups.iter().map(|g| g.kind).collect();
    assert_eq!(
        kinds,
        [crate::GroupKind::Layer(1), crate::GroupKind::Layer(0)]
    );
    assert_eq!(
        layout.groups.iter().map(|g| g.len()).sum::<usize>(),
        layout.total
    );
}
