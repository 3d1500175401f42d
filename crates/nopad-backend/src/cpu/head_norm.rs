//! The per-head RMSNorm on the CPU (Qwen3's `q_norm`/`k_norm`): every query and key head of a
//! packed `qkv` row normalised in place with the row math of `layers.rs`, so a head rounds
//! exactly as an RMSNorm row of length Dh would.

use rayon::prelude::*;

use super::layers::{rms_row, rms_row_dx};
use super::linear::add_column_sums;
use super::{check_len, clear, Cpu, Scalar};
use crate::args::{HeadRmsNormBwd, HeadRmsNormFwd};
use crate::error::check;
use crate::{HeadNormDims, Result};

/// Checks the shape and the lengths of the in-place rows (`qkv` or `d_qkv`, named `rows`), the
/// saved inputs `x`, `rstd` and the `weight`; `Ok(false)`: no token, nothing to compute.
fn check_dims<T>(
    op: &'static str,
    dims: HeadNormDims,
    rows: (&str, &[T]),
    [x, rstd, weight]: [&[T]; 3],
) -> Result<bool> {
    let (hn, dh) = (dims.normed_heads(), dims.head_dim);
    check(dims.heads > 0 && dims.kv_heads > 0 && dh > 0, op, || {
        format!("{dims:?}: every count must be at least 1")
    })?;
    let n = dims.n;
    check_len(op, rows.0, rows.1.len(), n * dims.row_stride())?;
    check_len(op, "x", x.len(), n * hn * dh)?;
    check_len(op, "rstd", rstd.len(), n * hn)?;
    check_len(op, "weight", weight.len(), 2 * dh)?;
    Ok(n > 0)
}

/// The weight of normalised head `h`: the query heads' first, then the key heads'.
fn head_weight<T>(weight: &[T], h: usize, dims: HeadNormDims) -> &[T] {
    let dh = dims.head_dim;
    let at = if h < dims.heads { 0 } else { dh };
    &weight[at..at + dh]
}

pub(crate) fn head_rmsnorm_forward<T: Scalar>(a: HeadRmsNormFwd<'_, Cpu<T>>) -> Result<()> {
    let HeadRmsNormFwd {
        qkv,
        x,
        rstd,
        weight,
        dims,
        eps,
    } = a;
    let saved = [&x[..], &rstd[..], weight];
    if !check_dims("head_rmsnorm_forward", dims, ("qkv", &qkv[..]), saved)? {
        return Ok(());
    }
    let (n, dh, hn, w) = (
        dims.n,
        dims.head_dim,
        dims.normed_heads(),
        dims.row_stride(),
    );
    let eps = T::from_f32(eps);
    let inv_d = T::ONE / T::from_f64(dh as f64);
    qkv[..n * w]
        .par_chunks_mut(w)
        .zip(x[..n * hn * dh].par_chunks_mut(hn * dh))
        .zip(rstd[..n * hn].par_chunks_mut(hn))
        .for_each(|((row, xs), rs)| {
            let heads = row[..hn * dh].chunks_mut(dh).zip(xs.chunks_mut(dh));
            for (h, ((y, xh), r)) in heads.zip(rs).enumerate() {
                xh.copy_from_slice(y);
                *r = rms_row(y, xh, head_weight(weight, h, dims), eps, inv_d);
            }
        });
    Ok(())
}

pub(crate) fn head_rmsnorm_backward<T: Scalar>(a: HeadRmsNormBwd<'_, Cpu<T>>) -> Result<()> {
    let HeadRmsNormBwd {
        d_qkv,
        mut d_weight,
        x,
        rstd,
        weight,
        dims,
        write,
    } = a;
    let dh = dims.head_dim;
    clear(d_weight.as_deref_mut(), 2 * dh, write);
    if let Some(dw) = &d_weight {
        check_len("head_rmsnorm_backward", "d_weight", dw.len(), 2 * dh)?;
    }
    if !check_dims(
        "head_rmsnorm_backward",
        dims,
        ("d_qkv", &d_qkv[..]),
        [x, rstd, weight],
    )? {
        return Ok(());
    }
    let (n, hq, hn, w) = (dims.n, dims.heads, dims.normed_heads(), dims.row_stride());
    let (x, rstd) = (&x[..n * hn * dh], &rstd[..n * hn]);
    // The weights' gradient first: it reads dy, which the input gradient then replaces. Each
    // head's dy·x·r is a row of the query or the key products, summed by columns in a fixed order.
    if let Some(dw) = d_weight {
        let hk = hn - hq;
        let (mut pq, mut pk) = (vec![T::ZERO; n * hq * dh], vec![T::ZERO; n * hk * dh]);
        pq.par_chunks_mut(hq * dh)
            .zip(pk.par_chunks_mut(hk * dh))
            .zip(d_qkv[..n * w].par_chunks(w))
            .zip(x.par_chunks(hn * dh).zip(rstd.par_chunks(hn)))
            .for_each(|(((pq, pk), dyr), (xr, rs))| {
                let prods = pq.chunks_mut(dh).chain(pk.chunks_mut(dh));
                let heads = dyr[..hn * dh].chunks(dh).zip(xr.chunks(dh)).zip(rs);
                for (p, ((g, v), &r)) in prods.zip(heads) {
                    for ((o, &g), &v) in p.iter_mut().zip(g).zip(v) {
                        *o = g * v * r;
                    }
                }
            });
        add_column_sums(&mut dw[..dh], &pq, n * hq, dh);
        add_column_sums(&mut dw[dh..2 * dh], &pk, n * hk, dh);
    }
    let inv_d = T::ONE / T::from_f64(dh as f64);
    d_qkv[..n * w]
        .par_chunks_mut(w)
        .zip(x.par_chunks(hn * dh).zip(rstd.par_chunks(hn)))
        .for_each(|(row, (xr, rs))| {
            let mut dy = vec![T::ZERO; dh];
            let heads = row[..hn * dh].chunks_mut(dh).zip(xr.chunks(dh)).zip(rs);
            for (h, ((g, v), &r)) in heads.enumerate() {
                // dx is accumulated onto zero: exactly the overwrite the op promises.
                dy.copy_from_slice(g);
                g.fill(T::ZERO);
                rms_row_dx(g, &dy, v, head_weight(weight, h, dims), r, inv_d);
            }
        });
    Ok(())
}
