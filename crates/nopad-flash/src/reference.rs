//! Naive CPU reference of varlen causal attention, forward and backward, in f64 — and the same
//! code with bf16 rounding at every step a bf16 framework would round (`Precision::Bf16`), whose
//! error against the f64 result sets the acceptance bound (FlashAttention's test rule).
//!
//! Layouts are the kernels': `qkv: [N, (H + 2 Hkv) * Dh]`, `d_out, out: [N, H * Dh]`,
//! `lse: [H, N]` (natural log), `d_qkv` like `qkv`. Per sequence and query head h (kv head
//! h / G): `P = softmax(scale q k^T)` over keys j <= i (and j > i - W under a sliding window
//! W, `FlashDims::window`); `D_i = dO_i . O_i`;
//! `dS = P (dP - D)`; `dQ = scale dS K`, `dK = scale dS^T Q`, `dV = P^T dO` summed over the group.
//! Rows are independent, so both passes run in parallel over (head, row) with rayon.

use rayon::prelude::*;

use crate::FlashDims;

/// Arithmetic of the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f64: the ground truth.
    F64,
    /// Round to bf16 after each matmul and after softmax, as a bf16 framework would.
    Bf16,
}

/// Reference results (f32 copies of the computed values).
pub struct Reference {
    /// `[N, H * Dh]`
    pub out: Vec<f32>,
    /// `[H, N]`
    pub lse: Vec<f32>,
    /// `[N, (H + 2 Hkv) * Dh]`
    pub d_qkv: Vec<f32>,
}

/// `x` rounded to the nearest bf16, ties to even, in one rounding (what a kernel's
/// `f32 -> bf16` conversion does to an exact value).
///
/// Not `half::bf16::from_f64`: it decides the rounding from the upper 32 bits of the f64 alone,
/// so a value just above a tie whose excess lies in the lower bits (an f32's last three mantissa
/// bits, for one) is rounded down. Here `x` goes to f32 rounded to odd (truncated, with the
/// lowest bit set when anything was cut), which keeps every bit bf16's rounding looks at, and
/// then to bf16 with `from_f32`, which rounds correctly.
pub fn bf16_round(x: f64) -> f64 {
    let f = x as f32;
    if !x.is_finite() || f as f64 == x {
        return half::bf16::from_f32(f).to_f64();
    }
    // `as` rounded to nearest: step back toward zero when it rounded away from zero.
    let truncated = if (f as f64).abs() > x.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    half::bf16::from_f32(f32::from_bits(truncated.to_bits() | 1)).to_f64()
}

/// Forward and backward of causal varlen attention on the CPU.
pub fn attention(
    qkv: &[f32],
    d_out: &[f32],
    cu: &[i32],
    dims: &FlashDims,
    prec: Precision,
) -> Reference {
    let (n, h_q, h_kv, dh) = (dims.n, dims.n_heads, dims.n_kv_heads, dims.head_dim);
    let group = h_q / h_kv;
    let rs = (h_q + 2 * h_kv) * dh;
    let scale = dims.scale as f64;
    // Keys of query i: first(i) ..= i; queries of key j: j .. past(j), within its sequence.
    let w = dims.window.unwrap_or(usize::MAX).max(1);
    let first = |s0: usize, i: usize| s0.max((i + 1).saturating_sub(w));
    let past = |s0: usize, len: usize, j: usize| (s0 + len).min(j.saturating_add(w));
    let rnd = |x: f64| {
        if prec == Precision::Bf16 {
            bf16_round(x)
        } else {
            x
        }
    };
    // Sequence start and length of each token.
    let mut seq_of = vec![(0usize, 0usize); n];
    for w in cu.windows(2) {
        seq_of[w[0] as usize..w[1] as usize].fill((w[0] as usize, (w[1] - w[0]) as usize));
    }
    // f64 copies, one contiguous row per (token, head), so the inner loops vectorise.
    let to64 = |src: &[f32], heads: usize, stride: usize, off: usize| -> Vec<f64> {
        let mut v = vec![0f64; n * heads * dh];
        v.par_chunks_mut(heads * dh)
            .enumerate()
            .for_each(|(t, row)| {
                for (x, &y) in row
                    .iter_mut()
                    .zip(&src[t * stride + off..t * stride + off + heads * dh])
                {
                    *x = y as f64;
                }
            });
        v
    };
    let (q64, k64, v64) = (
        to64(qkv, h_q, rs, 0),
        to64(qkv, h_kv, rs, h_q * dh),
        to64(qkv, h_kv, rs, (h_q + h_kv) * dh),
    );
    let do64 = to64(d_out, h_q, h_q * dh, 0);
    let q = |t: usize, h: usize| &q64[(t * h_q + h) * dh..(t * h_q + h + 1) * dh];
    let k = |t: usize, hk: usize| &k64[(t * h_kv + hk) * dh..(t * h_kv + hk + 1) * dh];
    let v = |t: usize, hk: usize| &v64[(t * h_kv + hk) * dh..(t * h_kv + hk + 1) * dh];
    let dout = |t: usize, h: usize| &do64[(t * h_q + h) * dh..(t * h_q + h + 1) * dh];
    let dot = |a: &[f64], b: &[f64]| -> f64 {
        let mut acc = [0f64; 4];
        let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
        let tail: f64 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ca.zip(cb) {
            for l in 0..4 {
                acc[l] += x[l] * y[l];
            }
        }
        acc[0] + acc[1] + acc[2] + acc[3] + tail
    };

    // Pass 1, per (h, t): out, lse, D, dq.
    struct Row {
        out: Vec<f64>,
        lse: f64,
        d: f64,
        dq: Vec<f64>,
    }
    let rows: Vec<Row> = (0..h_q * n)
        .into_par_iter()
        .map(|r| {
            let (h, t) = (r / n, r % n);
            let hk = h / group;
            let s0 = first(seq_of[t].0, t);
            let qi = q(t, h);
            let x: Vec<f64> = (s0..=t).map(|j| rnd(scale * dot(qi, k(j, hk)))).collect();
            let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = x.iter().map(|&xj| (xj - m).exp()).collect();
            let l: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|&ej| rnd(ej / l)).collect();
            let mut out = vec![0f64; dh];
            for (jj, &pj) in p.iter().enumerate() {
                for (o, &vv) in out.iter_mut().zip(v(s0 + jj, hk)) {
                    *o += pj * vv;
                }
            }
            out.iter_mut().for_each(|o| *o = rnd(*o));
            let dor = dout(t, h);
            let d = rnd(dot(&out, dor));
            let mut dq = vec![0f64; dh];
            for (jj, &pj) in p.iter().enumerate() {
                let dp = rnd(dot(dor, v(s0 + jj, hk)));
                let ds = rnd(pj * (dp - d));
                for (a, &kk) in dq.iter_mut().zip(k(s0 + jj, hk)) {
                    *a += ds * kk;
                }
            }
            dq.iter_mut().for_each(|a| *a = rnd(*a * scale));
            Row {
                out,
                lse: m + l.ln(),
                d,
                dq,
            }
        })
        .collect();

    // Pass 2, per (hk, key t): dk, dv summed over the group's heads and the rows i >= j.
    let kv: Vec<(Vec<f64>, Vec<f64>)> = (0..h_kv * n)
        .into_par_iter()
        .map(|r| {
            let (hk, j) = (r / n, r % n);
            let (s0, len) = seq_of[j];
            let (kj, vj) = (k(j, hk), v(j, hk));
            let mut dk = vec![0f64; dh];
            let mut dv = vec![0f64; dh];
            for h in hk * group..(hk + 1) * group {
                for i in j..past(s0, len, j) {
                    let row = &rows[h * n + i];
                    let qi = q(i, h);
                    let x = rnd(scale * dot(qi, kj));
                    let p = rnd((x - row.lse).exp());
                    let dor = dout(i, h);
                    let dp = rnd(dot(dor, vj));
                    let ds = rnd(p * (dp - row.d));
                    for e in 0..dh {
                        dk[e] += ds * qi[e];
                        dv[e] += p * dor[e];
                    }
                }
            }
            dk.iter_mut().for_each(|a| *a = rnd(*a * scale));
            dv.iter_mut().for_each(|a| *a = rnd(*a));
            (dk, dv)
        })
        .collect();

    let mut out = vec![0f32; n * h_q * dh];
    let mut lse = vec![0f32; h_q * n];
    let mut d_qkv = vec![0f32; n * rs];
    for (r, row) in rows.iter().enumerate() {
        let (h, t) = (r / n, r % n);
        lse[h * n + t] = row.lse as f32;
        for e in 0..dh {
            out[t * h_q * dh + h * dh + e] = row.out[e] as f32;
            d_qkv[t * rs + h * dh + e] = row.dq[e] as f32;
        }
    }
    for (r, (dk, dv)) in kv.iter().enumerate() {
        let (hk, t) = (r / n, r % n);
        for e in 0..dh {
            d_qkv[t * rs + (h_q + hk) * dh + e] = dk[e] as f32;
            d_qkv[t * rs + (h_q + h_kv + hk) * dh + e] = dv[e] as f32;
        }
    }
    Reference { out, lse, d_qkv }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loss = sum(out * d_out); its gradient w.r.t. qkv must match d_qkv (central differences
    /// in f64 on a tiny GQA batch with an empty and a length-1 sequence), without a window and
    /// with windows of 1, 2 and 4 keys (shorter than the 5-token sequence).
    #[test]
    fn gradients_match_finite_differences() {
        let cu = [0i32, 3, 3, 4, 9];
        for window in [None, Some(1), Some(2), Some(4)] {
            let dims = FlashDims {
                n: 9,
                n_seqs: 4,
                max_seqlen: 5,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 4,
                scale: 0.7,
                window,
            };
            let rs = (dims.n_heads + 2 * dims.n_kv_heads) * dims.head_dim;
            let mut rng = nopad_rng::Rng::new(7);
            // Values on a coarse grid are exact in f32 and keep the loss smooth enough.
            let qkv: Vec<f32> = (0..dims.n * rs)
                .map(|_| (rng.normal() * 64.0).round() as f32 / 64.0)
                .collect();
            let d_out: Vec<f32> = (0..dims.n * dims.n_heads * dims.head_dim)
                .map(|_| (rng.normal() * 64.0).round() as f32 / 64.0)
                .collect();
            let r = attention(&qkv, &d_out, &cu, &dims, Precision::F64);
            let loss = |x: &[f32]| -> f64 {
                let o = attention(x, &d_out, &cu, &dims, Precision::F64).out;
                o.iter()
                    .zip(&d_out)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum()
            };
            let eps = 1.0 / 256.0;
            let mut worst = 0f64;
            for idx in 0..qkv.len() {
                let mut p = qkv.clone();
                p[idx] += eps;
                let mut m = qkv.clone();
                m[idx] -= eps;
                let fd = (loss(&p) - loss(&m)) / (2.0 * eps as f64);
                worst = worst.max((fd - r.d_qkv[idx] as f64).abs());
            }
            // The out values pass through f32 (~1e-7 relative), and central differences carry
            // O(eps^2) ~ 1e-5 truncation error on these magnitudes.
            assert!(
                worst < 2e-3,
                "window {window:?}: max |fd - analytic| = {worst}"
            );
        }
    }

    /// A window of one key: every query sees only itself, so out = v, lse = scale q.k,
    /// dV = dO and dQ = dK = 0, on every token of a packed batch.
    #[test]
    fn a_window_of_one_key_attends_to_itself() {
        let dims = FlashDims {
            n: 4,
            n_seqs: 2,
            max_seqlen: 3,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
            scale: 0.5,
            window: Some(1),
        };
        let qkv: Vec<f32> = (0..4 * 6).map(|i| (i % 7) as f32 - 3.0).collect();
        let d_out: Vec<f32> = (0..4 * 2).map(|i| 0.25 * i as f32 - 1.0).collect();
        let r = attention(&qkv, &d_out, &[0, 3, 4], &dims, Precision::F64);
        for t in 0..4 {
            let row = &qkv[t * 6..t * 6 + 6];
            assert_eq!(r.out[2 * t..2 * t + 2], row[4..6], "out of token {t}");
            let qk = 0.5 * (row[0] * row[2] + row[1] * row[3]);
            assert!((r.lse[t] - qk).abs() < 1e-6, "lse of token {t}");
            assert_eq!(r.d_qkv[t * 6..t * 6 + 4], [0.0; 4], "dq, dk of token {t}");
            assert_eq!(r.d_qkv[t * 6 + 4..t * 6 + 6], d_out[2 * t..2 * t + 2]);
        }
    }

    /// A length-1 sequence: out = v, lse = scale q.k, dV = dO, dQ = dK = 0.
    #[test]
    fn length_one_sequence() {
        let dims = FlashDims {
            n: 1,
            n_seqs: 1,
            max_seqlen: 1,
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
            scale: 0.5,
            window: None,
        };
        let qkv = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let r = attention(&qkv, &[0.25, -1.0], &[0, 1], &dims, Precision::F64);
        assert_eq!(r.out, vec![5.0, 6.0]);
        assert!((r.lse[0] - 0.5 * 11.0).abs() < 1e-6);
        assert_eq!(r.d_qkv, vec![0.0, 0.0, 0.0, 0.0, 0.25, -1.0]);
    }

    #[test]
    fn bf16_round_sees_every_bit() {
        let tie = f32::from_bits(0x3cea_8000) as f64;
        // An exact tie goes to the even neighbour, below.
        assert_eq!(bf16_round(tie), f32::from_bits(0x3cea_0000) as f64);
        // Just above the tie, by an f32's lowest bit or by less than an f32 can hold: up. (The
        // first is the case `half::bf16::from_f64` rounds down.)
        let up = f32::from_bits(0x3ceb_0000) as f64;
        assert_eq!(bf16_round(f32::from_bits(0x3cea_8001) as f64), up);
        assert_eq!(bf16_round(tie + tie * 2f64.powi(-40)), up);
        assert_eq!(bf16_round(-(tie + tie * 2f64.powi(-40))), -up);
        // Just below: down.
        assert_eq!(
            bf16_round(tie - tie * 2f64.powi(-40)),
            f32::from_bits(0x3cea_0000) as f64
        );
        assert_eq!(bf16_round(1.0), 1.0);
        assert!(bf16_round(f64::NAN).is_nan());
    }
}
