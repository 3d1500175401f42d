//! Varlen causal grouped-query attention on the CPU: the reference every GPU kernel is checked
//! against.
//!
//! One task per (sequence, key/value head) computes that head group's rows; tasks run in
//! parallel and write their results back in a fixed order. The backward recomputes the
//! probabilities from the saved log-sum-exp (no `[L, L]` matrix is kept between passes).

use rayon::prelude::*;

use super::{check_len, Scalar};
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

pub(crate) fn forward<T: Scalar>(
    out: &mut [T],
    lse: &mut [T],
    qkv: &[T],
    cu: &[i32],
    dims: AttnDims,
) -> Result<()> {
    const OP: &str = "attention_forward";
    check_dims(OP, qkv, cu, &dims)?;
    let (n, h, dh) = (dims.n, dims.n_heads, dims.head_dim);
    check_len(OP, "out", out.len(), n * h * dh)?;
    check_len(OP, "lse", lse.len(), h * n)?;
    let lay = Layout::new(&dims);
    let group = h / dims.n_kv_heads;
    let scale = T::from_f32(dims.scale);
    // Each task returns (rows × group heads × dh) outputs and (group heads × rows) lse values.
    let results: Vec<(Vec<T>, Vec<T>)> = tasks(cu, dims.n_kv_heads)
        .par_iter()
        .map(|&(s, e, g)| {
            let len = e - s;
            let mut o = vec![T::ZERO; len * group * dh];
            let mut l = vec![T::ZERO; group * len];
            let mut p = vec![T::ZERO; len];
            for hh in 0..group {
                let head = g * group + hh;
                for i in 0..len {
                    let q = &qkv[lay.q(s + i, head)..][..dh];
                    let mut m = T::neg_infinity();
                    for j in 0..=i {
                        let x = dot(q, &qkv[lay.k(s + j, g)..][..dh]) * scale;
                        p[j] = x;
                        m = m.max(x);
                    }
                    let mut sum = T::ZERO;
                    for pj in &mut p[..=i] {
                        *pj = (*pj - m).exp();
                        sum += *pj;
                    }
                    let orow = &mut o[(i * group + hh) * dh..][..dh];
                    for (j, &pj) in p[..=i].iter().enumerate() {
                        let v = &qkv[lay.v(s + j, g)..][..dh];
                        for (oo, &vv) in orow.iter_mut().zip(v) {
                            *oo += pj * vv;
                        }
                    }
                    let inv = T::ONE / sum;
                    orow.iter_mut().for_each(|x| *x *= inv);
                    l[hh * len + i] = m + sum.ln();
                }
            }
            (o, l)
        })
        .collect();
    for (&(s, e, g), (o, l)) in tasks(cu, dims.n_kv_heads).iter().zip(&results) {
        let len = e - s;
        for i in 0..len {
            for hh in 0..group {
                let head = g * group + hh;
                out[(s + i) * h * dh + head * dh..][..dh]
                    .copy_from_slice(&o[(i * group + hh) * dh..][..dh]);
                lse[head * n + s + i] = l[hh * len + i];
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Scalar>(
    d_qkv: &mut [T],
    d_out: &[T],
    qkv: &[T],
    out: &[T],
    lse: &[T],
    cu: &[i32],
    dims: AttnDims,
) -> Result<()> {
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
    // Per task: dq for the group's heads [len, group, dh], dk and dv [len, dh].
    let results: Vec<(Vec<T>, Vec<T>, Vec<T>)> = tasks(cu, dims.n_kv_heads)
        .par_iter()
        .map(|&(s, e, g)| {
            let len = e - s;
            let mut dq = vec![T::ZERO; len * group * dh];
            let mut dk = vec![T::ZERO; len * dh];
            let mut dv = vec![T::ZERO; len * dh];
            let mut ds = vec![T::ZERO; len];
            for hh in 0..group {
                let head = g * group + hh;
                for i in 0..len {
                    let t = s + i;
                    let q = &qkv[lay.q(t, head)..][..dh];
                    let dout = &d_out[t * h * dh + head * dh..][..dh];
                    let o = &out[t * h * dh + head * dh..][..dh];
                    let di = dot(dout, o); // rowsum(dO ∘ O)
                    let l = lse[head * n + t];
                    for j in 0..=i {
                        let k = &qkv[lay.k(s + j, g)..][..dh];
                        let v = &qkv[lay.v(s + j, g)..][..dh];
                        let p = (dot(q, k) * scale - l).exp();
                        let dvj = &mut dv[j * dh..][..dh];
                        for (a, &b) in dvj.iter_mut().zip(dout) {
                            *a += p * b;
                        }
                        ds[j] = p * (dot(dout, v) - di) * scale;
                    }
                    let dqi = &mut dq[(i * group + hh) * dh..][..dh];
                    for j in 0..=i {
                        let k = &qkv[lay.k(s + j, g)..][..dh];
                        for (a, &b) in dqi.iter_mut().zip(k) {
                            *a += ds[j] * b;
                        }
                        for (a, &b) in dk[j * dh..][..dh].iter_mut().zip(q) {
                            *a += ds[j] * b;
                        }
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    d_qkv[..n * lay.width].fill(T::ZERO);
    for (&(s, e, g), (dq, dk, dv)) in tasks(cu, dims.n_kv_heads).iter().zip(&results) {
        for i in 0..e - s {
            let t = s + i;
            for hh in 0..group {
                d_qkv[lay.q(t, g * group + hh)..][..dh]
                    .copy_from_slice(&dq[(i * group + hh) * dh..][..dh]);
            }
            d_qkv[lay.k(t, g)..][..dh].copy_from_slice(&dk[i * dh..][..dh]);
            d_qkv[lay.v(t, g)..][..dh].copy_from_slice(&dv[i * dh..][..dh]);
        }
    }
    Ok(())
}
