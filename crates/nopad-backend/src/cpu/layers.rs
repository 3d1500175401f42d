//! Row-wise ops on the CPU: embedding, RMSNorm, RoPE, SwiGLU and reductions.

use rayon::prelude::*;

use super::linear::add_column_sums;
use super::{check_len, clear, Cpu, Scalar};
use crate::args::{EmbeddingBwd, EmbeddingFwd, RmsNormBwd, RmsNormFwd, Rope, SwigluBwd, SwigluFwd};
use crate::error::check;
use crate::{Result, RopeDims};

/// Σx² in f64, summed per fixed-size chunk and then over chunks in order (deterministic).
pub(crate) fn sum_squares<T: Scalar>(x: &[T]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(1 << 14)
        .map(|c| c.iter().map(|&v| v.to_f64() * v.to_f64()).sum::<f64>())
        .collect();
    partials.iter().sum()
}

fn check_tokens(op: &'static str, tokens: &[i32], n: usize, vocab: usize) -> Result<()> {
    check_len(op, "tokens", tokens.len(), n)?;
    for (t, &tok) in tokens[..n].iter().enumerate() {
        check(tok >= 0 && (tok as usize) < vocab, op, || {
            format!("token id {tok} at position {t} is outside the vocabulary of {vocab}")
        })?;
    }
    Ok(())
}

pub(crate) fn embedding_forward<T: Scalar>(a: EmbeddingFwd<'_, Cpu<T>>) -> Result<()> {
    let EmbeddingFwd {
        x,
        table,
        tokens,
        n,
        d,
    } = a;
    check_len("embedding_forward", "x", x.len(), n * d)?;
    check_tokens("embedding_forward", tokens, n, table.len() / d.max(1))?;
    x[..n * d]
        .par_chunks_mut(d)
        .zip(&tokens[..n])
        .for_each(|(row, &tok)| {
            let t = tok as usize;
            row.copy_from_slice(&table[t * d..(t + 1) * d]);
        });
    Ok(())
}

pub(crate) fn embedding_backward<T: Scalar>(a: EmbeddingBwd<'_, Cpu<T>>) -> Result<()> {
    let EmbeddingBwd {
        d_table,
        dx,
        tokens,
        n,
        d,
    } = a;
    check_len("embedding_backward", "dx", dx.len(), n * d)?;
    check_tokens("embedding_backward", tokens, n, d_table.len() / d.max(1))?;
    // Sequential over tokens: repeated ids add in token order, so the result is deterministic.
    for (t, &tok) in tokens[..n].iter().enumerate() {
        let row = &mut d_table[tok as usize * d..(tok as usize + 1) * d];
        row.iter_mut()
            .zip(&dx[t * d..(t + 1) * d])
            .for_each(|(o, &g)| *o += g);
    }
    Ok(())
}

pub(crate) fn rmsnorm_forward<T: Scalar>(a: RmsNormFwd<'_, Cpu<T>>) -> Result<()> {
    let RmsNormFwd {
        y,
        rstd,
        x,
        weight,
        n,
        d,
        eps,
    } = a;
    const OP: &str = "rmsnorm_forward";
    check_len(OP, "y", y.len(), n * d)?;
    check_len(OP, "rstd", rstd.len(), n)?;
    check_len(OP, "x", x.len(), n * d)?;
    check_len(OP, "weight", weight.len(), d)?;
    let eps = T::from_f32(eps);
    let inv_d = T::ONE / T::from_f64(d as f64);
    y[..n * d]
        .par_chunks_mut(d)
        .zip(rstd[..n].par_iter_mut())
        .zip(x[..n * d].par_chunks(d))
        .for_each(|((yr, r), xr)| *r = rms_row(yr, xr, &weight[..d], eps, inv_d));
    Ok(())
}

/// One row of RMSNorm, `y = x · r · w`, returning `r = 1/√(Σx² · inv_d + eps)` (shared with the
/// per-head norm, so both round alike).
pub(crate) fn rms_row<T: Scalar>(y: &mut [T], x: &[T], weight: &[T], eps: T, inv_d: T) -> T {
    let mut ss = T::ZERO;
    for &v in x {
        ss += v * v;
    }
    let rs = T::ONE / (ss * inv_d + eps).sqrt();
    for ((o, &v), &w) in y.iter_mut().zip(x).zip(weight) {
        *o = v * rs * w;
    }
    rs
}

/// One row of RMSNorm's backward, `dx += r·w·dy − r³·x·inv_d · Σ dy·w·x` (y = w·x·r with
/// r = (mean x² + eps)^-½).
pub(crate) fn rms_row_dx<T: Scalar>(dx: &mut [T], dy: &[T], x: &[T], weight: &[T], r: T, inv_d: T) {
    let mut dot = T::ZERO;
    for ((&g, &w), &v) in dy.iter().zip(weight).zip(x) {
        dot += g * w * v;
    }
    let c = r * r * r * dot * inv_d;
    for (((o, &g), &w), &v) in dx.iter_mut().zip(dy).zip(weight).zip(x) {
        *o += r * w * g - c * v;
    }
}

pub(crate) fn rmsnorm_backward<T: Scalar>(a: RmsNormBwd<'_, Cpu<T>>) -> Result<()> {
    let RmsNormBwd {
        dx,
        d_weight,
        dy,
        x,
        weight,
        rstd,
        n,
        d,
        write,
    } = a;
    const OP: &str = "rmsnorm_backward";
    for (name, len, need) in [
        ("dx", dx.len(), n * d),
        ("dy", dy.len(), n * d),
        ("x", x.len(), n * d),
        ("rstd", rstd.len(), n),
        ("weight", weight.len(), d),
    ] {
        check_len(OP, name, len, need)?;
    }
    if let Some(dw) = &d_weight {
        check_len(OP, "d_weight", dw.len(), d)?;
    }
    let inv_d = T::ONE / T::from_f64(d as f64);
    dx[..n * d]
        .par_chunks_mut(d)
        .zip(dy[..n * d].par_chunks(d))
        .zip(x[..n * d].par_chunks(d))
        .zip(rstd[..n].par_iter())
        .for_each(|(((dxr, dyr), xr), &r)| rms_row_dx(dxr, dyr, xr, &weight[..d], r, inv_d));
    // d_weight += Σ_t dy·x·r, as column sums of the row products (fixed order).
    let Some(d_weight) = d_weight else {
        return Ok(());
    };
    clear(Some(&mut *d_weight), d, write);
    let mut prod = vec![T::ZERO; n * d];
    prod.par_chunks_mut(d)
        .zip(dy[..n * d].par_chunks(d))
        .zip(x[..n * d].par_chunks(d))
        .zip(rstd[..n].par_iter())
        .for_each(|(((p, dyr), xr), &r)| {
            for ((o, &g), &v) in p.iter_mut().zip(dyr).zip(xr) {
                *o = g * v * r;
            }
        });
    add_column_sums(d_weight, &prod, n, d);
    Ok(())
}

/// RoPE in place; `inverse` applies the rotation by −θ (the backward).
pub(crate) fn rope<T: Scalar>(a: Rope<'_, Cpu<T>>, inverse: bool) -> Result<()> {
    let Rope {
        x,
        inv_freq,
        positions,
        dims,
    } = a;
    const OP: &str = "rope";
    let RopeDims {
        n,
        row_stride,
        n_rot_heads,
        head_dim,
    } = dims;
    check(head_dim.is_multiple_of(2), OP, || {
        format!("head_dim {head_dim} is odd")
    })?;
    check(n_rot_heads * head_dim <= row_stride, OP, || {
        format!("{n_rot_heads} heads of {head_dim} do not fit a row of {row_stride}")
    })?;
    let half = head_dim / 2;
    check_len(OP, "inv_freq", inv_freq.len(), half)?;
    check_len(OP, "positions", positions.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    check_len(
        OP,
        "x",
        x.len(),
        (n - 1) * row_stride + n_rot_heads * head_dim,
    )?;
    let inv: Vec<f32> = inv_freq[..half].iter().map(|v| v.to_f32()).collect();
    x.par_chunks_mut(row_stride)
        .take(n)
        .zip(&positions[..n])
        .for_each(|(row, &pos)| {
            // The angle in f32, as HF computes it (inv_freq · position in float32).
            let (sin, cos): (Vec<T>, Vec<T>) = inv
                .iter()
                .map(|&f| {
                    let th = pos as f32 * f;
                    let s = T::from_f32(th.sin());
                    (if inverse { -s } else { s }, T::from_f32(th.cos()))
                })
                .unzip();
            for head in row[..n_rot_heads * head_dim].chunks_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        });
    Ok(())
}

fn sigmoid<T: Scalar>(g: T) -> T {
    T::ONE / (T::ONE + (-g).exp())
}

pub(crate) fn swiglu_forward<T: Scalar>(args: SwigluFwd<'_, Cpu<T>>) -> Result<()> {
    let SwigluFwd { a, gu, n, f } = args;
    check_len("swiglu_forward", "a", a.len(), n * f)?;
    check_len("swiglu_forward", "gu", gu.len(), n * 2 * f)?;
    a[..n * f]
        .par_chunks_mut(f)
        .zip(gu[..n * 2 * f].par_chunks(2 * f))
        .for_each(|(ar, gur)| {
            let (g, u) = gur.split_at(f);
            for ((o, &gg), &uu) in ar.iter_mut().zip(g).zip(u) {
                *o = gg * sigmoid(gg) * uu;
            }
        });
    Ok(())
}

pub(crate) fn swiglu_backward<T: Scalar>(a: SwigluBwd<'_, Cpu<T>>) -> Result<()> {
    let SwigluBwd { gu, d_a, n, f } = a;
    check_len("swiglu_backward", "d_a", d_a.len(), n * f)?;
    check_len("swiglu_backward", "gu", gu.len(), n * 2 * f)?;
    gu[..n * 2 * f]
        .par_chunks_mut(2 * f)
        .zip(d_a[..n * f].par_chunks(f))
        .for_each(|(row, dar)| {
            let (g, u) = row.split_at_mut(f);
            for i in 0..f {
                let (gi, ui) = (g[i], u[i]);
                let s = sigmoid(gi);
                let silu = gi * s;
                u[i] = dar[i] * silu;
                g[i] = dar[i] * ui * s * (T::ONE + gi * (T::ONE - s));
            }
        });
    Ok(())
}
