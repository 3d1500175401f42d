//! The ops a low-rank adapter adds on the CPU: its output scattered into (and its gradient
//! gathered from) columns of a fused projection, and seeded dropout.

use rayon::prelude::*;

use super::{check_len, Cpu, Scalar, ROW_CHUNK};
use crate::args::{AddColumns, Dropout, GatherColumns};
use crate::error::check;
use crate::{dropout_keep, dropout_scale, dropout_threshold, GradWrite, Result};

fn check_cols(op: &'static str, stride: usize, c0: usize, w: usize) -> Result<()> {
    check(c0 + w <= stride, op, || {
        format!("columns {c0}..{} exceed the row length {stride}", c0 + w)
    })
}

pub(crate) fn add_columns<T: Scalar>(a: AddColumns<'_, Cpu<T>>) -> Result<()> {
    let AddColumns {
        y,
        x,
        n,
        stride,
        c0,
        w,
        s,
    } = a;
    const OP: &str = "add_columns";
    check_cols(OP, stride, c0, w)?;
    check_len(OP, "y", y.len(), n * stride)?;
    check_len(OP, "x", x.len(), n * w)?;
    if n * w == 0 {
        return Ok(());
    }
    let s = T::from_f32(s);
    y[..n * stride]
        .par_chunks_mut(stride)
        .zip(x[..n * w].par_chunks(w))
        .with_min_len(ROW_CHUNK)
        .for_each(|(yr, xr)| {
            for (o, &v) in yr[c0..c0 + w].iter_mut().zip(xr) {
                *o += s * v;
            }
        });
    Ok(())
}

pub(crate) fn gather_columns<T: Scalar>(a: GatherColumns<'_, Cpu<T>>) -> Result<()> {
    let GatherColumns {
        y,
        x,
        n,
        stride,
        c0,
        w,
        s,
    } = a;
    const OP: &str = "gather_columns";
    check_cols(OP, stride, c0, w)?;
    check_len(OP, "y", y.len(), n * w)?;
    check_len(OP, "x", x.len(), n * stride)?;
    if n * w == 0 {
        return Ok(());
    }
    let s = T::from_f32(s);
    y[..n * w]
        .par_chunks_mut(w)
        .zip(x[..n * stride].par_chunks(stride))
        .with_min_len(ROW_CHUNK)
        .for_each(|(yr, xr)| {
            for (o, &v) in yr.iter_mut().zip(&xr[c0..c0 + w]) {
                *o = s * v;
            }
        });
    Ok(())
}

pub(crate) fn dropout<T: Scalar>(a: Dropout<'_, Cpu<T>>) -> Result<()> {
    let Dropout {
        y,
        x,
        n,
        p,
        seed,
        write,
    } = a;
    const OP: &str = "dropout";
    check((0.0..1.0).contains(&p), OP, || {
        format!("the drop probability {p} is outside [0, 1)")
    })?;
    check_len(OP, "y", y.len(), n)?;
    check_len(OP, "x", x.len(), n)?;
    let (thr, keep) = (dropout_threshold(p), T::from_f64(dropout_scale(p)));
    y[..n]
        .par_iter_mut()
        .zip(x[..n].par_iter())
        .enumerate()
        .with_min_len(1 << 12)
        .for_each(|(i, (o, &v))| {
            let m = if dropout_keep(seed, i as u64, thr) {
                v * keep
            } else {
                T::ZERO
            };
            match write {
                GradWrite::Overwrite => *o = m,
                GradWrite::Accumulate => *o += m,
            }
        });
    Ok(())
}
