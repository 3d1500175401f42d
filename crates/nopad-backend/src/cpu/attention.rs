//! Varlen causal grouped-query attention on the CPU: the reference every GPU kernel is checked
//! against.
//!
//! One task per (sequence, key/value head) gathers that sequence's K and V (and each query head
//! of the group) into dense matrices and does the products with SIMD GEMMs on a `[L, L]`
//! score matrix; tasks run in parallel and write back in a fixed order, so results are
//! deterministic. The backward recomputes the probabilities from the saved log-sum-exp (no
//! `[L, L]` matrix is kept between passes).

use rayon::prelude::*;

use super::linear::{gemm, Mat, Threads};
use super::{check_len, Cpu, Scalar};
use crate::args::{AttnBwd, AttnFwd};
use crate::error::check;
use crate::{AttnDims, Result};

fn check_dims<T>(op: &'static str, qkv: &[T], cu: &[i32], dims: &AttnDims) -> Result<()> {
    check(
        dims.n_kv_heads > 0 && dims.n_heads.is_multiple_of(dims.n_kv_heads),
        op,
        || {
            format!(
                "{} query heads are not a multiple of {} kv heads",
                dims.n_heads, dims.n_kv_heads
            )
        },
    )?;
    check(cu.len() == dims.n_seqs + 1, op, || {
        format!(
            "cu_seqlens has {} entries for {} sequences",
            cu.len(),
            dims.n_seqs
        )
    })?;
    check(
        cu.first() == Some(&0) && cu.last().map(|&e| e as usize) == Some(dims.n),
        op,
        || {
            format!(
                "cu_seqlens must run from 0 to {} (got {:?}..{:?})",
                dims.n,
                cu.first(),
                cu.last()
            )
        },
    )?;
    for w in cu.windows(2) {
        check(
            w[0] <= w[1] && (w[1] - w[0]) as usize <= dims.max_seqlen,
            op,
            || {
                format!(
                    "segment {}..{} is decreasing or longer than max_seqlen {}",
                    w[0], w[1], dims.max_seqlen
                )
            },
        )?;
    }
    check_len(op, "qkv", qkv.len(), dims.n * dims.qkv_width())
}

/// Where the query/key/value vectors of one token and head live in `qkv`.
struct Layout {
    width: usize,
    dh: usize,
    k_off: usize,
    v_off: usize,
}

impl Layout {
    fn new(d: &AttnDims) -> Self {
        Layout {
            width: d.qkv_width(),
            dh: d.head_dim,
            k_off: d.n_heads * d.head_dim,
            v_off: (d.n_heads + d.n_kv_heads) * d.head_dim,
        }
    }
    fn q(&self, t: usize, h: usize) -> usize {
        t * self.width + h * self.dh
    }
    fn k(&self, t: usize, g: usize) -> usize {
        t * self.width + self.k_off + g * self.dh
    }
    fn v(&self, t: usize, g: usize) -> usize {
        t * self.width + self.v_off + g * self.dh
    }
}

fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    let mut s = T::ZERO;
    for (&x, &y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// Copies the `[len, dh]` vectors starting at `first(t)` for tokens `s..s+len` into a dense matrix.
fn gather<T: Scalar>(
    src: &[T],
    s: usize,
    len: usize,
    dh: usize,
    at: impl Fn(usize) -> usize,
) -> Vec<T> {
    let mut m = Vec::with_capacity(len * dh);
    for i in 0..len {
        m.extend_from_slice(&src[at(s + i)..][..dh]);
    }
    m
}

/// `p[len, len] = scale · q · kᵀ` (q, k: `[len, dh]`), the raw scores of one head.
fn scores<T: Scalar>(p: &mut [T], q: &[T], k: &[T], len: usize, dh: usize, scale: T) {
    let (qm, kt) = (Mat::rows(q, dh), Mat::transposed(k, dh));
    gemm(len, len, dh, p, len, qm, kt, false, scale, Threads::One);
}

/// Causal probabilities of one (sequence, head) in place: `s: [len, len]` holds scaled scores on
/// entry and `P` (zero above the diagonal) on exit. With `lse` given (backward) P is recomputed
/// from it; otherwise each row's log-sum-exp is written to `lse_out`.
fn probabilities<T: Scalar>(s: &mut [T], len: usize, lse: Option<&[T]>, lse_out: &mut [T]) {
    for i in 0..len {
        let row = &mut s[i * len..(i + 1) * len];
        let l = match lse {
            Some(l) => l[i],
            None => {
                let m = row[..=i].iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                let mut sum = T::ZERO;
                for &x in &row[..=i] {
                    sum += (x - m).exp();
                }
                let l = m + sum.ln();
                lse_out[i] = l;
                l
            }
        };
        for x in &mut row[..=i] {
            *x = (*x - l).exp();
        }
        row[i + 1..].fill(T::ZERO);
    }
}

fn tasks(cu: &[i32], n_kv_heads: usize) -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for w in cu.windows(2) {
        if w[1] > w[0] {
            for g in 0..n_kv_heads {
                v.push((w[0] as usize, w[1] as usize, g));
            }
        }
    }
    v
}

pub(crate) fn forward<T: Scalar>(a: AttnFwd<'_, Cpu<T>>) -> Result<()> {
    let AttnFwd {
        out,
        lse,
        qkv,
        cu_seqlens: cu,
        dims,
    } = a;
    const OP: &str = "attention_forward";
    check_dims(OP, qkv, cu, &dims)?;
    let (n, h, dh) = (dims.n, dims.n_heads, dims.head_dim);
    check_len(OP, "out", out.len(), n * h * dh)?;
    check_len(OP, "lse", lse.len(), h * n)?;
    let lay = Layout::new(&dims);
    let group = h / dims.n_kv_heads;
    let scale = T::from_f32(dims.scale);
    let work = tasks(cu, dims.n_kv_heads);
    // Each task returns its heads' outputs `[group][len, dh]` and log-sum-exps `[group][len]`.
    let results: Vec<(Vec<T>, Vec<T>)> = work
        .par_iter()
        .map(|&(s, e, g)| {
            let len = e - s;
            let k = gather(qkv, s, len, dh, |t| lay.k(t, g));
            let v = gather(qkv, s, len, dh, |t| lay.v(t, g));
            let mut o = vec![T::ZERO; group * len * dh];
            let mut l = vec![T::ZERO; group * len];
            let mut p = vec![T::ZERO; len * len];
            for hh in 0..group {
                let q = gather(qkv, s, len, dh, |t| lay.q(t, g * group + hh));
                scores(&mut p, &q, &k, len, dh, scale);
                probabilities(&mut p, len, None, &mut l[hh * len..(hh + 1) * len]);
                let oh = &mut o[hh * len * dh..(hh + 1) * len * dh];
                gemm(
                    len,
                    dh,
                    len,
                    oh,
                    dh,
                    Mat::rows(&p, len),
                    Mat::rows(&v, dh),
                    false,
                    T::ONE,
                    Threads::One,
                );
            }
            (o, l)
        })
        .collect();
    for (&(s, e, g), (o, l)) in work.iter().zip(&results) {
        let len = e - s;
        for hh in 0..group {
            let head = g * group + hh;
            for i in 0..len {
                out[(s + i) * h * dh + head * dh..][..dh]
                    .copy_from_slice(&o[(hh * len + i) * dh..][..dh]);
            }
            lse[head * n + s..head * n + e].copy_from_slice(&l[hh * len..(hh + 1) * len]);
        }
    }
    Ok(())
}

pub(crate) fn backward<T: Scalar>(a: AttnBwd<'_, Cpu<T>>) -> Result<()> {
    let AttnBwd {
        d_qkv,
        d_out,
        qkv,
        out,
        lse,
        cu_seqlens: cu,
        dims,
    } = a;
    const OP: &str = "attention_backward";
    check_dims(OP, qkv, cu, &dims)?;
    let (n, h, dh) = (dims.n, dims.n_heads, dims.head_dim);
    check_len(OP, "d_qkv", d_qkv.len(), n * dims.qkv_width())?;
    check_len(OP, "d_out", d_out.len(), n * h * dh)?;
    check_len(OP, "out", out.len(), n * h * dh)?;
    check_len(OP, "lse", lse.len(), h * n)?;
    let lay = Layout::new(&dims);
    let group = h / dims.n_kv_heads;
    let scale = T::from_f32(dims.scale);
    let work = tasks(cu, dims.n_kv_heads);
    // Per task: dq `[group][len, dh]`, dk and dv `[len, dh]` (summed over the group's heads).
    let results: Vec<(Vec<T>, Vec<T>, Vec<T>)> = work
        .par_iter()
        .map(|&(s, e, g)| {
            let len = e - s;
            let k = gather(qkv, s, len, dh, |t| lay.k(t, g));
            let v = gather(qkv, s, len, dh, |t| lay.v(t, g));
            let mut dq = vec![T::ZERO; group * len * dh];
            let mut dk = vec![T::ZERO; len * dh];
            let mut dv = vec![T::ZERO; len * dh];
            let mut p = vec![T::ZERO; len * len];
            let mut dp = vec![T::ZERO; len * len];
            let mut unused = [];
            for hh in 0..group {
                let head = g * group + hh;
                let q = gather(qkv, s, len, dh, |t| lay.q(t, head));
                let dout = gather(d_out, s, len, dh, |t| t * h * dh + head * dh);
                let o = gather(out, s, len, dh, |t| t * h * dh + head * dh);
                scores(&mut p, &q, &k, len, dh, scale);
                probabilities(
                    &mut p,
                    len,
                    Some(&lse[head * n + s..head * n + e]),
                    &mut unused,
                );
                // dV += Pᵀ·dO; dP = dO·Vᵀ; dS = P∘(dP − rowsum(dO∘O)).
                gemm(
                    len,
                    dh,
                    len,
                    &mut dv,
                    dh,
                    Mat::transposed(&p, len),
                    Mat::rows(&dout, dh),
                    true,
                    T::ONE,
                    Threads::One,
                );
                gemm(
                    len,
                    len,
                    dh,
                    &mut dp,
                    len,
                    Mat::rows(&dout, dh),
                    Mat::transposed(&v, dh),
                    false,
                    T::ONE,
                    Threads::One,
                );
                for i in 0..len {
                    let di = dot(&dout[i * dh..(i + 1) * dh], &o[i * dh..(i + 1) * dh]);
                    for j in 0..=i {
                        p[i * len + j] *= dp[i * len + j] - di;
                    }
                }
                // p now holds dS (zero above the diagonal): dQ = s·dS·K, dK += s·dSᵀ·Q.
                let dqh = &mut dq[hh * len * dh..(hh + 1) * len * dh];
                gemm(
                    len,
                    dh,
                    len,
                    dqh,
                    dh,
                    Mat::rows(&p, len),
                    Mat::rows(&k, dh),
                    false,
                    scale,
                    Threads::One,
                );
                gemm(
                    len,
                    dh,
                    len,
                    &mut dk,
                    dh,
                    Mat::transposed(&p, len),
                    Mat::rows(&q, dh),
                    true,
                    scale,
                    Threads::One,
                );
            }
            (dq, dk, dv)
        })
        .collect();
    d_qkv[..n * lay.width].fill(T::ZERO);
    for (&(s, e, g), (dq, dk, dv)) in work.iter().zip(&results) {
        for i in 0..e - s {
            let t = s + i;
            for hh in 0..group {
                d_qkv[lay.q(t, g * group + hh)..][..dh]
                    .copy_from_slice(&dq[(hh * (e - s) + i) * dh..][..dh]);
            }
            d_qkv[lay.k(t, g)..][..dh].copy_from_slice(&dk[i * dh..][..dh]);
            d_qkv[lay.v(t, g)..][..dh].copy_from_slice(&dv[i * dh..][..dh]);
        }
    }
    Ok(())
}
