//! Every CPU op against a naive reference (forward) and central finite differences in f64
//! (backward). f64 makes the comparison exact to ~1e-7 relative, so the tolerances below are
//! far from anything a wrong formula could meet.
//!
//! These tests make `Cpu<f64>` the reference of `tests/conformance.rs`. The file runs past 600
//! lines because each op's test holds its own naive formula next to the check that uses it.

use super::Cpu;
use crate::prelude::*;
use nopad_rng::Rng;

type B = Cpu<f64>;

fn randn(rng: &mut Rng, n: usize, s: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * s).collect()
}

fn dotv(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks `analytic` against central differences of `loss` around `x`. Relative to the
/// largest gradient; f64 central differences with h = 1e-5 are accurate to ~1e-9 here.
fn fd_check(name: &str, x: &[f64], analytic: &[f64], loss: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: length");
    let h = 1e-5;
    let mut xs = x.to_vec();
    let scale = analytic.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    for i in 0..x.len() {
        let orig = xs[i];
        xs[i] = orig + h;
        let lp = loss(&xs);
        xs[i] = orig - h;
        let lm = loss(&xs);
        xs[i] = orig;
        let num = (lp - lm) / (2.0 * h);
        worst = worst.max((num - analytic[i]).abs() / scale);
    }
    assert!(
        worst < 1e-6,
        "{name}: finite-difference mismatch, relative error {worst:e}"
    );
}

fn close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale && g.is_finite(),
            "{name}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn linear_matches_naive_and_finite_differences() {
    let b = B::new();
    let mut rng = Rng::new(11);
    for &(n, d_in, d_out) in &[(1, 1, 1), (7, 5, 3), (13, 17, 11), (70, 33, 65)] {
        let dims = LinearDims { n, d_in, d_out };
        let x = randn(&mut rng, n * d_in, 1.0);
        let w = randn(&mut rng, d_out * d_in, 1.0);
        let bias = randn(&mut rng, d_out, 1.0);
        let r = randn(&mut rng, n * d_out, 1.0);
        let fwd = |x: &[f64], w: &[f64], bias: &[f64]| {
            let mut y = vec![0.0; n * d_out];
            b.linear_forward(LinearFwd {
                y: &mut y,
                x,
                w,
                b: Some(bias),
                dims,
            })
            .unwrap();
            y
        };
        let y = fwd(&x, &w, &bias);
        let mut naive = vec![0.0; n * d_out];
        for t in 0..n {
            for o in 0..d_out {
                naive[t * d_out + o] =
                    bias[o] + dotv(&x[t * d_in..][..d_in], &w[o * d_in..][..d_in]);
            }
        }
        close("linear y", &y, &naive, 1e-12);
        let mut dx = vec![f64::NAN; n * d_in];
        let mut dw = vec![0.5; d_out * d_in]; // accumulates on top of 0.5
        let mut db = vec![0.0; d_out];
        // Both backward calls read the same dy, x and w; the buffers and the rule vary.
        let bwd = |dx: Option<&mut [f64]>, d_w: &mut [f64], d_b: &mut [f64], write| {
            b.linear_backward(LinearBwd {
                dx,
                dx_write: GradWrite::Overwrite,
                d_w: Some(d_w),
                d_b: Some(d_b),
                dy: &r,
                x: &x,
                w: &w,
                dims,
                write,
            })
            .unwrap()
        };
        bwd(Some(&mut dx), &mut dw, &mut db, GradWrite::Accumulate);
        dw.iter_mut().for_each(|v| *v -= 0.5);
        // Overwriting ignores what the gradients held (NaN here).
        let (mut dw2, mut db2) = (vec![f64::NAN; d_out * d_in], vec![f64::NAN; d_out]);
        bwd(None, &mut dw2, &mut db2, GradWrite::Overwrite);
        close("linear dw overwrite", &dw2, &dw, 1e-12);
        close("linear db overwrite", &db2, &db, 1e-12);
        fd_check("linear dx", &x, &dx, |x| dotv(&fwd(x, &w, &bias), &r));
        fd_check("linear dw", &w, &dw, |w| dotv(&fwd(&x, w, &bias), &r));
        fd_check("linear db", &bias, &db, |bb| dotv(&fwd(&x, &w, bb), &r));
    }
}

#[test]
fn rmsnorm_finite_differences_and_residual_accumulation() {
    let b = B::new();
    let mut rng = Rng::new(12);
    let (n, d, eps) = (9, 13, 1e-5f32);
    let x = randn(&mut rng, n * d, 1.0);
    let w = randn(&mut rng, d, 1.0);
    let r = randn(&mut rng, n * d, 1.0);
    let fwd = |x: &[f64], w: &[f64]| {
        let (mut y, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
        b.rmsnorm_forward(RmsNormFwd {
            y: &mut y,
            rstd: &mut rstd,
            x,
            weight: w,
            n,
            d,
            eps,
        })
        .unwrap();
        (y, rstd)
    };
    let (y, rstd) = fwd(&x, &w);
    for t in 0..n {
        let ms = x[t * d..][..d].iter().map(|v| v * v).sum::<f64>() / d as f64;
        let want = 1.0 / (ms + eps as f64).sqrt();
        assert!((rstd[t] - want).abs() < 1e-12);
        assert!((y[t * d] - x[t * d] * want * w[0]).abs() < 1e-12);
    }
    let base = randn(&mut rng, n * d, 1.0);
    let mut dx = base.clone();
    let mut dw = vec![0.0; d];
    b.rmsnorm_backward(RmsNormBwd {
        dx: &mut dx,
        d_weight: Some(&mut dw),
        dy: &r,
        x: &x,
        weight: &w,
        rstd: &rstd,
        n,
        d,
        write: GradWrite::Accumulate,
    })
    .unwrap();
    let mut dw2 = vec![f64::NAN; d];
    b.rmsnorm_backward(RmsNormBwd {
        dx: &mut base.clone(),
        d_weight: Some(&mut dw2),
        dy: &r,
        x: &x,
        weight: &w,
        rstd: &rstd,
        n,
        d,
        write: GradWrite::Overwrite,
    })
    .unwrap();
    assert_eq!(dw2, dw, "an overwrite ignores the NaN it finds");
    let dx: Vec<f64> = dx.iter().zip(&base).map(|(a, b)| a - b).collect();
    fd_check("rmsnorm dx", &x, &dx, |x| dotv(&fwd(x, &w).0, &r));
    fd_check("rmsnorm dw", &w, &dw, |w| dotv(&fwd(&x, w).0, &r));
}

/// The per-head norm: each query head is RMSNorm with the first Dh weights, each key head with
/// the last Dh, the value heads untouched; its in-place backward and weight gradient against
/// finite differences.
#[test]
fn head_rmsnorm_is_rmsnorm_per_head_and_matches_finite_differences() {
    // GQA 3/2 heads of 6 over 5 tokens.
    let [n, heads, kv_heads, head_dim] = [5, 3, 2, 6];
    let dims = HeadNormDims {
        n,
        heads,
        kv_heads,
        head_dim,
    };
    let (b, mut rng) = (B::new(), Rng::new(14));
    let (n, dh, hn, w) = (
        dims.n,
        dims.head_dim,
        dims.normed_heads(),
        dims.row_stride(),
    );
    let qkv = randn(&mut rng, n * w, 1.0);
    let weight = randn(&mut rng, 2 * dh, 1.0);
    let fwd = |qkv: &[f64], weight: &[f64]| {
        let (mut y, mut x, mut rstd) =
            (qkv.to_vec(), vec![f64::NAN; n * hn * dh], vec![0.0; n * hn]);
        b.head_rmsnorm_forward(HeadRmsNormFwd {
            qkv: &mut y,
            x: &mut x,
            rstd: &mut rstd,
            weight,
            dims,
            eps: 1e-6,
        })
        .unwrap();
        (y, x, rstd)
    };
    let (y, x, rstd) = fwd(&qkv, &weight);
    for t in 0..n {
        let row = &qkv[t * w..][..w];
        for h in 0..hn {
            let head = &row[h * dh..][..dh];
            let hw = &weight[if h < dims.heads { 0 } else { dh }..][..dh];
            let (mut want, mut r) = (vec![0.0; dh], vec![0.0]);
            b.rmsnorm_forward(RmsNormFwd {
                y: &mut want,
                rstd: &mut r,
                x: head,
                weight: hw,
                n: 1,
                d: dh,
                eps: 1e-6,
            })
            .unwrap();
            assert_eq!(&y[t * w + h * dh..][..dh], &want[..], "token {t} head {h}");
            assert_eq!(rstd[t * hn + h], r[0]);
            assert_eq!(&x[(t * hn + h) * dh..][..dh], head);
        }
        assert_eq!(
            &y[t * w + hn * dh..][..w - hn * dh],
            &row[hn * dh..],
            "values"
        );
    }
    let dy = randn(&mut rng, n * w, 1.0);
    let bwd = |write, dw: &mut [f64], frozen: bool| {
        let mut g = dy.clone();
        b.head_rmsnorm_backward(HeadRmsNormBwd {
            d_qkv: &mut g,
            d_weight: (!frozen).then_some(dw),
            x: &x,
            rstd: &rstd,
            weight: &weight,
            dims,
            write,
        })
        .unwrap();
        g
    };
    let base = randn(&mut rng, 2 * dh, 1.0);
    let mut dw = base.clone();
    let dx = bwd(GradWrite::Accumulate, &mut dw, false);
    let mut dw2 = vec![f64::NAN; 2 * dh];
    assert_eq!(bwd(GradWrite::Overwrite, &mut dw2, false), dx);
    assert_eq!(bwd(GradWrite::Overwrite, &mut [], true), dx, "frozen");
    let dw: Vec<f64> = dw.iter().zip(&base).map(|(a, b)| a - b).collect();
    close("head_rmsnorm dw overwrite", &dw2, &dw, 1e-12);
    // The value heads pass y = v, so the op's whole output (their dy untouched) is ∂L/∂qkv.
    fd_check("head_rmsnorm dx", &qkv, &dx, |q| {
        dotv(&fwd(q, &weight).0, &dy)
    });
    fd_check("head_rmsnorm dw", &weight, &dw, |wt| {
        dotv(&fwd(&qkv, wt).0, &dy)
    });
}

#[test]
fn rope_rotates_halves_and_backward_is_the_transpose() {
    let b = B::new();
    let mut rng = Rng::new(13);
    let (n, heads, dh, stride) = (6, 3, 8, 3 * 8 + 5);
    let dims = RopeDims {
        n,
        row_stride: stride,
        n_rot_heads: heads,
        head_dim: dh,
    };
    let inv: Vec<f64> = (0..dh / 2)
        .map(|i| 1.0 / 10000f64.powf(2.0 * i as f64 / dh as f64))
        .collect();
    let inv32: Vec<f64> = inv.iter().map(|&v| v as f32 as f64).collect();
    let pos = vec![0, 1, 2, 0, 5, 1000];
    let x = randn(&mut rng, n * stride, 1.0);
    let fwd = |x: &[f64]| {
        let mut y = x.to_vec();
        b.rope_forward(Rope {
            x: &mut y,
            inv_freq: &inv32,
            positions: &pos,
            dims,
        })
        .unwrap();
        y
    };
    let y = fwd(&x);
    for t in 0..n {
        for hd in 0..heads {
            for i in 0..dh / 2 {
                let th = pos[t] as f32 * inv32[i] as f32;
                let (s, c) = (th.sin() as f64, th.cos() as f64);
                let base = t * stride + hd * dh;
                let (x1, x2) = (x[base + i], x[base + i + dh / 2]);
                assert!((y[base + i] - (x1 * c - x2 * s)).abs() < 1e-12);
                assert!((y[base + i + dh / 2] - (x2 * c + x1 * s)).abs() < 1e-12);
            }
        }
        // Columns past the rotated heads are untouched.
        assert_eq!(
            &y[t * stride + heads * dh..(t + 1) * stride],
            &x[t * stride + heads * dh..(t + 1) * stride]
        );
    }
    let r = randn(&mut rng, n * stride, 1.0);
    let mut dx = r.clone();
    b.rope_backward(Rope {
        x: &mut dx,
        inv_freq: &inv32,
        positions: &pos,
        dims,
    })
    .unwrap();
    fd_check("rope dx", &x, &dx, |x| dotv(&fwd(x), &r));
}

#[test]
fn swiglu_finite_differences() {
    let b = B::new();
    let mut rng = Rng::new(14);
    let (n, f) = (5, 7);
    let gu = randn(&mut rng, n * 2 * f, 2.0);
    let r = randn(&mut rng, n * f, 1.0);
    let fwd = |gu: &[f64]| {
        let mut a = vec![0.0; n * f];
        b.swiglu_forward(SwigluFwd {
            a: &mut a,
            gu,
            n,
            f,
        })
        .unwrap();
        a
    };
    let a = fwd(&gu);
    let (g, u) = (gu[3], gu[f + 3]);
    assert!((a[3] - g / (1.0 + (-g).exp()) * u).abs() < 1e-12);
    let mut dgu = gu.clone();
    b.swiglu_backward(SwigluBwd {
        gu: &mut dgu,
        d_a: &r,
        n,
        f,
    })
    .unwrap();
    fd_check("swiglu", &gu, &dgu, |gu| dotv(&fwd(gu), &r));
}

/// Dense reference: full [N, N] scores with a block-diagonal causal mask built from cu_seqlens,
/// narrowed to the sliding window (`i - j < W`) when `d.window` is set.
fn naive_attention(qkv: &[f64], cu: &[i32], d: &AttnDims) -> Vec<f64> {
    let (n, h, hkv, dh) = (d.n, d.n_heads, d.n_kv_heads, d.head_dim);
    let w = d.qkv_width();
    let seg = |t: usize| {
        cu.windows(2)
            .position(|s| (s[0] as usize) <= t && t < s[1] as usize)
            .unwrap()
    };
    let mut out = vec![0.0; n * h * dh];
    for hd in 0..h {
        let g = hd / (h / hkv);
        for i in 0..n {
            let q = &qkv[i * w + hd * dh..][..dh];
            let in_window = |j: usize| d.window.is_none_or(|w| i - j < w);
            let vis: Vec<usize> = (0..=i)
                .filter(|&j| seg(j) == seg(i) && in_window(j))
                .collect();
            let s: Vec<f64> = vis
                .iter()
                .map(|&j| dotv(q, &qkv[j * w + h * dh + g * dh..][..dh]) * d.scale as f64)
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for (idx, &j) in vis.iter().enumerate() {
                let p = (s[idx] - m).exp() / z;
                for e in 0..dh {
                    out[i * h * dh + hd * dh + e] += p * qkv[j * w + (h + hkv) * dh + g * dh + e];
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_dense_reference_and_finite_differences() {
    let b = B::new();
    let mut rng = Rng::new(15);
    // Lengths include 1, an empty segment and a non-power-of-two; GQA 4/2 and MHA 2/2 and MQA 3/1;
    // sliding windows of 1, 2 and 3 keys over sequences longer than them, and one longer than
    // every sequence.
    for &(ref lens, h, hkv, dh, window) in &[
        (vec![3usize, 1, 0, 5], 4usize, 2usize, 4usize, None),
        (vec![7], 2, 2, 6, None),
        (vec![2, 4], 3, 1, 2, None),
        (vec![3, 1, 0, 7, 2], 4, 2, 4, Some(2)),
        (vec![7], 2, 2, 6, Some(1)),
        (vec![6, 5], 3, 1, 2, Some(3)),
        (vec![2, 4], 3, 1, 2, Some(9)),
    ] {
        let mut cu = vec![0i32];
        for &l in lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        let n = *cu.last().unwrap() as usize;
        let dims = AttnDims {
            n,
            n_seqs: lens.len(),
            max_seqlen: *lens.iter().max().unwrap(),
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: dh,
            scale: 1.0 / (dh as f32).sqrt(),
            window,
        };
        let qkv = randn(&mut rng, n * dims.qkv_width(), 1.0);
        let fwd = |qkv: &[f64]| {
            let mut out = vec![f64::NAN; n * h * dh];
            let mut lse = vec![f64::NAN; h * n];
            b.attention_forward(AttnFwd {
                out: &mut out,
                lse: &mut lse,
                qkv,
                cu_seqlens: &cu,
                dims,
            })
            .unwrap();
            (out, lse)
        };
        let (out, lse) = fwd(&qkv);
        close(
            "attention out",
            &out,
            &naive_attention(&qkv, &cu, &dims),
            1e-12,
        );
        assert!(lse.iter().all(|v| v.is_finite()));
        let r = randn(&mut rng, n * h * dh, 1.0);
        let mut dqkv = vec![f64::NAN; n * dims.qkv_width()];
        b.attention_backward(AttnBwd {
            d_qkv: &mut dqkv,
            d_out: &r,
            qkv: &qkv,
            out: &out,
            lse: &lse,
            cu_seqlens: &cu,
            dims,
        })
        .unwrap();
        fd_check("attention dqkv", &qkv, &dqkv, |x| dotv(&fwd(x).0, &r));
    }
}

#[test]
fn attention_isolation_changes_the_result() {
    // The same tokens as two segments and as one: outputs of the second segment differ.
    let b = B::new();
    let mut rng = Rng::new(16);
    let dims = |n_seqs, max| AttnDims {
        n: 6,
        n_seqs,
        max_seqlen: max,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        scale: 0.5,
        window: None,
    };
    let qkv = randn(&mut rng, 6 * dims(1, 6).qkv_width(), 1.0);
    let mut o1 = vec![0.0; 6 * 8];
    let mut o2 = vec![0.0; 6 * 8];
    let mut lse = vec![0.0; 12];
    b.attention_forward(AttnFwd {
        out: &mut o1,
        lse: &mut lse,
        qkv: &qkv,
        cu_seqlens: &vec![0, 3, 6],
        dims: dims(2, 3),
    })
    .unwrap();
    b.attention_forward(AttnFwd {
        out: &mut o2,
        lse: &mut lse,
        qkv: &qkv,
        cu_seqlens: &vec![0, 6],
        dims: dims(1, 6),
    })
    .unwrap();
    assert_eq!(&o1[..24], &o2[..24]);
    assert!(o1[24..]
        .iter()
        .zip(&o2[24..])
        .any(|(a, b)| (a - b).abs() > 1e-6));
}

#[test]
fn lm_head_loss_matches_naive_and_finite_differences() {
    let b = B::new();
    let mut rng = Rng::new(17);
    let (n, d, v) = (6, 5, 11);
    let dims = LinearDims {
        n,
        d_in: d,
        d_out: v,
    };
    let x = randn(&mut rng, n * d, 1.0);
    let w = randn(&mut rng, v * d, 1.0);
    let targets = vec![3, -100, 0, 10, -100, 7];
    let scale = 0.25f32;
    // Every call below shares the case's dims and scale; only buffers, targets and rule vary.
    let run = |loss_sum: &mut [f64],
               dx: Option<&mut [f64]>,
               d_w: Option<&mut [f64]>,
               (x, w): (&[f64], &[f64]),
               targets: &Vec<i32>,
               write| {
        b.lm_head_loss(LmHeadLoss {
            loss_sum,
            dx,
            d_w,
            x,
            w,
            targets,
            dims,
            grad_scale: scale,
            write,
        })
    };
    let loss = |x: &[f64], w: &[f64]| {
        let mut l = vec![0.0];
        run(&mut l, None, None, (x, w), &targets, GradWrite::Accumulate).unwrap();
        l[0]
    };
    let mut naive = 0.0;
    for t in 0..n {
        if targets[t] < 0 {
            continue;
        }
        let logits: Vec<f64> = (0..v)
            .map(|o| dotv(&x[t * d..][..d], &w[o * d..][..d]))
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        naive += lse - logits[targets[t] as usize];
    }
    assert!((loss(&x, &w) - naive).abs() < 1e-12);
    let mut l = vec![1.0];
    let mut dx = vec![f64::NAN; n * d];
    let mut dw = vec![0.0; v * d];
    let xw = (&x[..], &w[..]);
    let acc = GradWrite::Accumulate;
    run(&mut l, Some(&mut dx), Some(&mut dw), xw, &targets, acc).unwrap();
    let mut dw2 = vec![f64::NAN; v * d];
    let over = GradWrite::Overwrite;
    run(&mut [0.0], None, Some(&mut dw2), xw, &targets, over).unwrap();
    assert_eq!(dw2, dw, "an overwrite ignores the NaN it finds");
    assert!(
        (l[0] - 1.0 - naive).abs() < 1e-12,
        "loss accumulates into loss_sum"
    );
    assert!(
        dx[d..2 * d].iter().all(|&g| g == 0.0),
        "rows without target get zero gradient"
    );
    fd_check("lm_head dx", &x, &dx, |x| scale as f64 * loss(x, &w));
    fd_check("lm_head dw", &w, &dw, |w| scale as f64 * loss(&x, w));
    let bad = vec![11, -100, 0, 0, 0, 0];
    let err = run(&mut l, None, None, xw, &bad, acc).unwrap_err();
    assert!(err.to_string().contains("target 11 at row 0"), "{err}");
}

#[test]
fn embedding_gathers_and_scatters_with_repeats() {
    let b = B::new();
    let mut rng = Rng::new(18);
    let (vocab, d) = (5, 3);
    let table = randn(&mut rng, vocab * d, 1.0);
    let tokens = vec![4, 1, 4, 0];
    let mut x = vec![0.0; 4 * d];
    b.embedding_forward(EmbeddingFwd {
        x: &mut x,
        table: &table,
        tokens: &tokens,
        n: 4,
        d,
    })
    .unwrap();
    assert_eq!(&x[..d], &table[4 * d..5 * d]);
    let dx = randn(&mut rng, 4 * d, 1.0);
    let mut dt = vec![1.0; vocab * d];
    b.embedding_backward(EmbeddingBwd {
        d_table: &mut dt,
        dx: &dx,
        tokens: &tokens,
        n: 4,
        d,
    })
    .unwrap();
    for e in 0..d {
        assert!((dt[4 * d + e] - (1.0 + dx[e] + dx[2 * d + e])).abs() < 1e-12);
        assert_eq!(dt[2 * d + e], 1.0);
    }
    let err = b
        .embedding_forward(EmbeddingFwd {
            x: &mut x,
            table: &table,
            tokens: &vec![5, 0, 0, 0],
            n: 4,
            d,
        })
        .unwrap_err();
    assert!(err.to_string().contains("token id 5"), "{err}");
}

#[test]
fn adamw_matches_the_scalar_formula() {
    let b = B::new();
    let hp = AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
        grad_scale: 0.5,
    };
    let (mut p, g, mut m, mut v) = (
        vec![1.0, -2.0],
        vec![0.3, -0.7],
        vec![0.1, 0.2],
        vec![0.01, 0.02],
    );
    let want: Vec<f64> = (0..2)
        .map(|i| {
            let gi = g[i] * 0.5;
            let mi = 0.9f32 as f64 * m[i] + (1.0 - 0.9f32 as f64) * gi;
            let vi = 0.99f32 as f64 * v[i] + (1.0 - 0.99f32 as f64) * gi * gi;
            let (b1, b2) = (0.9f32 as f64, 0.99f32 as f64);
            let mh = mi / (1.0 - b1.powi(3));
            let vh = vi / (1.0 - b2.powi(3));
            p[i] * (1.0 - 0.1f32 as f64 * 0.01f32 as f64)
                - 0.1f32 as f64 * mh / (vh.sqrt() + 1e-8f32 as f64 * 1.0)
        })
        .collect();
    b.adamw(AdamWStep {
        param: &mut p,
        master: None,
        grad: &g,
        m: &mut m,
        v: &mut v,
        n: 2,
        hp,
    })
    .unwrap();
    // eps enters as eps (not eps·√bc2), as in torch; the difference is below 1e-9 here.
    close("adamw", &p, &want, 1e-8);
}

#[test]
fn reductions_are_deterministic_and_shape_errors_are_reported() {
    let b = Cpu::<f32>::new();
    let mut rng = Rng::new(19);
    let x: Vec<f32> = (0..100_000).map(|_| rng.normal() as f32).collect();
    let s1 = b.sum_squares(&x, x.len()).unwrap();
    let s2 = b.sum_squares(&x, x.len()).unwrap();
    assert_eq!(s1.to_bits(), s2.to_bits());
    let mut y = vec![0.0f32; 3];
    let err = b.add(&mut y, &x, &x, 4).unwrap_err();
    assert!(
        err.to_string().contains("add: out has 3 elements, needs 4"),
        "{err}"
    );
}

#[test]
fn alloc_parts_checks_alignment_and_bounds() {
    use crate::Kind;
    let b = Cpu::<f32>::new();
    let ok = b
        .alloc_parts(1024, &[(0, 4, Kind::Compute), (256, 192, Kind::Grad)])
        .unwrap();
    assert_eq!(ok.iter().map(|p| p.len()).collect::<Vec<_>>(), [4, 192]);
    for bad in [(100, 4, Kind::Master), (768, 65, Kind::Master)] {
        let Err(err) = b.alloc_parts(1024, &[bad]) else {
            panic!("{bad:?} accepted");
        };
        let err = err.to_string();
        assert!(err.contains("unaligned or outside the 1024 bytes"), "{err}");
    }
}

#[test]
fn linear_backward_frozen_weight_and_accumulated_dx() {
    // The reference semantics the conformance suite holds every backend to: without d_w only dx
    // is computed (bit for bit the dx of a full backward); dx_write Accumulate adds the same dx
    // onto what the buffer held.
    let b = B::new();
    let mut rng = Rng::new(20);
    let dims = LinearDims {
        n: 13,
        d_in: 17,
        d_out: 11,
    };
    let (x, w, dy) = (
        randn(&mut rng, 13 * 17, 1.0),
        randn(&mut rng, 11 * 17, 1.0),
        randn(&mut rng, 13 * 11, 1.0),
    );
    let bwd = |dx: &mut [f64], dx_write, d_w: Option<&mut [f64]>| {
        b.linear_backward(LinearBwd {
            dx: Some(dx),
            dx_write,
            d_w,
            d_b: None,
            dy: &dy,
            x: &x,
            w: &w,
            dims,
            write: GradWrite::Overwrite,
        })
        .unwrap()
    };
    let (mut full, mut dw) = (vec![f64::NAN; 13 * 17], vec![f64::NAN; 11 * 17]);
    bwd(&mut full, GradWrite::Overwrite, Some(&mut dw));
    let mut frozen = vec![f64::NAN; 13 * 17];
    bwd(&mut frozen, GradWrite::Overwrite, None);
    assert_eq!(frozen, full, "a frozen weight changes dx");
    let base = randn(&mut rng, 13 * 17, 1.0);
    let mut acc = base.clone();
    bwd(&mut acc, GradWrite::Accumulate, None);
    let want: Vec<f64> = base.iter().zip(&full).map(|(a, b)| a + b).collect();
    close("dx accumulated", &acc, &want, 1e-14);
    let mut s = base.clone();
    b.scale(&mut s, 0.5, 13 * 17).unwrap();
    assert!(s.iter().zip(&base).all(|(a, b)| *a == 0.5 * b));
}
