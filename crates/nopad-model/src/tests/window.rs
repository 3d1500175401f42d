//! Sliding-window attention through the whole model, in f64: the loss of a Mistral-shaped model
//! (every layer slides) and of a Qwen2-shaped one (a sliding and a full layer) against a dense
//! forward written here, whose attention builds each layer's mask from the documents and the
//! window (nothing shared with the model but the layout and RoPE's inverse frequencies); the
//! model's gradients against central differences of that reference, over a few training steps;
//! and packed rows against one document at a time.

use nopad_backend::cpu::Cpu;
use nopad_rng::Rng;

use super::packed::Packed;
use super::{assert_fd, examples, flatten, loss_and_grads, model, rel_diff, tiny};
use crate::config::LayerType;
use crate::{Arch, Config, Layout, Model};

/// `y[r] = Σ_c m[r, c] x[c]` for a row-major `[rows, x.len()]` matrix.
fn matvec(m: &[f64], x: &[f64]) -> Vec<f64> {
    m.chunks(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// RMSNorm as HF: `x / sqrt(mean(x²) + eps) · g`.
fn rmsnorm(x: &[f64], g: &[f64], eps: f64) -> Vec<f64> {
    let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(g).map(|(v, g)| v * r * g).collect()
}

/// The loss sum of batch `p` under `cfg` with parameters `w`, by a dense forward: every
/// attention row scores all tokens and keeps key j for query i iff both lie in one document,
/// `j <= i` and, in a layer with window W, `i - j < W`.
fn dense_loss(cfg: &Config, lay: &Layout, w: &[f64], p: &Packed) -> f64 {
    let (d, f, dh) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (h, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let eps = cfg.rms_norm_eps as f32 as f64;
    let n = p.tokens.len();
    let doc = |t: usize| p.cu.iter().filter(|&&c| c as usize <= t).count();
    let inv = crate::rope::inv_freq(cfg);
    let par = |r: &std::ops::Range<usize>| &w[r.clone()];
    let mut x: Vec<Vec<f64>> = p
        .tokens
        .iter()
        .map(|&tok| par(&lay.embed)[tok as usize * d..][..d].to_vec())
        .collect();
    for (l, lr) in lay.layers.iter().enumerate() {
        let window = cfg.layer_window(l);
        let qkv: Vec<Vec<f64>> = (0..n)
            .map(|t| {
                let mut y = matvec(par(&lr.qkv_w), &rmsnorm(&x[t], par(&lr.ln1), eps));
                if let Some(b) = &lr.qkv_b {
                    y.iter_mut().zip(par(b)).for_each(|(y, b)| *y += b);
                }
                // RoPE on the q and k heads, the angle in f32 as HF computes it.
                for head in y[..(h + hkv) * dh].chunks_mut(dh) {
                    let (a, b) = head.split_at_mut(dh / 2);
                    for i in 0..dh / 2 {
                        let th = p.pos[t] as f32 * inv[i];
                        let (s, c) = (th.sin() as f64, th.cos() as f64);
                        (a[i], b[i]) = (a[i] * c - b[i] * s, b[i] * c + a[i] * s);
                    }
                }
                y
            })
            .collect();
        for i in 0..n {
            let mut att = vec![0.0; h * dh];
            for hq in 0..h {
                let g = hq / (h / hkv);
                let q = &qkv[i][hq * dh..][..dh];
                let visible = |j: usize| doc(j) == doc(i) && window.is_none_or(|w| i - j < w);
                let keys: Vec<usize> = (0..=i).filter(|&j| visible(j)).collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let k = &qkv[j][(h + g) * dh..][..dh];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (dh as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for (&j, sj) in keys.iter().zip(&s) {
                    let v = &qkv[j][(h + hkv + g) * dh..][..dh];
                    for e in 0..dh {
                        att[hq * dh + e] += (sj - m).exp() / z * v[e];
                    }
                }
            }
            let mut o = matvec(par(&lr.o_w), &att);
            if let Some(b) = &lr.o_b {
                o.iter_mut().zip(par(b)).for_each(|(y, b)| *y += b);
            }
            x[i].iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let gu = matvec(par(&lr.gate_up_w), &rmsnorm(&x[i], par(&lr.ln2), eps));
            let a: Vec<f64> = (0..f)
                .map(|k| gu[k] / (1.0 + (-gu[k]).exp()) * gu[f + k])
                .collect();
            let down = matvec(par(&lr.down_w), &a);
            x[i].iter_mut().zip(&down).for_each(|(x, o)| *x += o);
        }
    }
    let mut loss = 0.0;
    for (t, &target) in p.targets.iter().enumerate() {
        if target == -100 {
            continue;
        }
        let logits = matvec(par(&lay.lm_head), &rmsnorm(&x[t], par(&lay.norm), eps));
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss += lse - logits[target as usize];
    }
    loss
}

/// A Mistral-shaped tiny model: every layer slides with a window of 3.
fn mistral() -> Config {
    let mut c = tiny(false, false);
    c.arch = Arch::Mistral;
    c.sliding_window = Some(3);
    c
}

/// A Qwen2-shaped tiny model (q/k/v biases): layer 0 slides with a window of 2, layer 1 is full.
fn qwen2() -> Config {
    let mut c = tiny(false, true);
    c.arch = Arch::Qwen2;
    c.sliding_window = Some(2);
    c.layer_types = Some(vec![LayerType::Sliding, LayerType::Full]);
    c
}

/// Documents of 10, 2, 10 and 7 tokens (all but one longer than the windows).
fn batch(cfg: &Config) -> Packed {
    flatten(&examples(
        &mut Rng::new(61),
        &[10, 2, 10, 7],
        cfg.vocab_size,
    ))
}

fn eval_loss(b: &Cpu<f64>, m: &mut Model<Cpu<f64>>, p: &Packed) -> f64 {
    m.forward_eval(b, &p.inputs()).unwrap();
    m.take_loss_sum(b).unwrap()
}

#[test]
fn windowed_models_train_with_the_loss_and_gradients_of_a_dense_masked_forward() {
    for cfg in [mistral(), qwen2()] {
        let b = Cpu::<f64>::new();
        let mut m = model(&b, cfg.clone(), 62);
        let p = batch(&cfg);
        let lay = m.layout.clone();
        // The window matters: without it the reference loss is another number.
        let mut full = cfg.clone();
        full.sliding_window = None;
        let unwindowed = dense_loss(&full, &lay, &m.params, &p);
        let mut rng = Rng::new(63);
        for step in 0..3 {
            let want = dense_loss(&cfg, &lay, &m.params, &p);
            let got = eval_loss(&b, &mut m, &p);
            let what = format!("{:?} step {step}", cfg.arch);
            assert!(
                (got - want).abs() <= 1e-10 * want.abs(),
                "{what}: {got} vs {want}"
            );
            if step == 0 {
                assert!((unwindowed - want).abs() > 1e-3 * want.abs(), "{what}");
            }
            // The gradients against central differences of the reference, a few elements of
            // every tensor.
            let (loss, grads) = loss_and_grads(&b, &mut m, &[&p], 1.0);
            assert!(
                (loss - got).abs() <= 1e-12 * got.abs(),
                "{what}: train loss"
            );
            let scale = grads.iter().fold(0.0f64, |a, g| a.max(g.abs()));
            let hstep = 1e-5;
            for t in &lay.tensors {
                for _ in 0..3 {
                    let i = t.offset + rng.below(t.len() as u64) as usize;
                    let mut w = m.params.to_vec();
                    w[i] += hstep;
                    let lp = dense_loss(&cfg, &lay, &w, &p);
                    w[i] -= 2.0 * hstep;
                    let lm = dense_loss(&cfg, &lay, &w, &p);
                    let what = format!("{what}: {} element {}", t.name, i - t.offset);
                    assert_fd(&what, (lp, lm, hstep), grads[i], scale);
                }
            }
            // A plain gradient step, so the next comparison runs on trained weights.
            for (w, g) in m.params.iter_mut().zip(&grads) {
                *w -= 0.05 * g;
            }
        }
    }
}

#[test]
fn windowed_packed_rows_equal_one_document_at_a_time() {
    for cfg in [mistral(), qwen2()] {
        let exs = examples(&mut Rng::new(64), &[10, 2, 10, 7], cfg.vocab_size);
        let b = Cpu::<f64>::new();
        let mut m = model(&b, cfg.clone(), 65);
        let packed = flatten(&exs);
        let (l_packed, g_packed) = loss_and_grads(&b, &mut m, &[&packed], 1.0);
        let docs: Vec<Packed> = exs
            .iter()
            .map(|e| flatten(std::slice::from_ref(e)))
            .collect();
        let refs: Vec<&Packed> = docs.iter().collect();
        let (l_docs, g_docs) = loss_and_grads(&b, &mut m, &refs, 1.0);
        let what = format!("{:?}", cfg.arch);
        assert!(
            (l_packed - l_docs).abs() <= 1e-12 * l_docs.abs(),
            "{what}: loss"
        );
        assert!(rel_diff(&g_packed, &g_docs) < 1e-12, "{what}: gradients");
    }
}
