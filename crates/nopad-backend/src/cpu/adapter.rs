//! The ops a low-rank adapter adds on the CPU: its output scattered into (and its gradient
//! gathered from) columns of a fused projection, seeded dropout, and the dequantisation of an
//! NF4 base weight (QLoRA).

use rayon::prelude::*;

use super::{check_len, Cpu, Scalar, ROW_CHUNK};
use crate::args::{Columns, DequantNf4, Dropout};
use crate::error::check;
use crate::{dropout_keep, dropout_scale, dropout_threshold, GradWrite, Result};

/// An adapter's columns added in or gathered (see [`Columns`]).
pub(crate) fn columns<T: Scalar>(a: Columns<'_, Cpu<T>>) -> Result<()> {
    let add = a.add;
    let [n, stride, c0, w] = a.rows;
    let (op, ylen, xlen) = a.lens()?;
    check_len(op, "y", a.y.len(), ylen)?;
    check_len(op, "x", a.x.len(), xlen)?;
    if n * w == 0 {
        return Ok(());
    }
    let s = T::from_f32(a.s);
    let (ystep, xstep) = if add { (stride, w) } else { (w, stride) };
    a.y[..ylen]
        .par_chunks_mut(ystep)
        .zip(a.x[..xlen].par_chunks(xstep))
        .with_min_len(ROW_CHUNK)
        .for_each(|(yr, xr)| {
            if add {
                for (o, &v) in yr[c0..c0 + w].iter_mut().zip(xr) {
                    *o += s * v;
                }
            } else {
                for (o, &v) in yr.iter_mut().zip(&xr[c0..c0 + w]) {
                    *o = s * v;
                }
            }
        });
    Ok(())
}

pub(crate) fn dropout<T: Scalar>(a: Dropout<'_, Cpu<T>>) -> Result<()> {
    const OP: &str = "dropout";
    let (n, p, seed, write) = (a.n, a.p, a.seed, a.write);
    let (y, x) = (a.y, a.x);
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

/// An NF4 matrix read into values of `T` (see [`DequantNf4`]): [`crate::nf4::dequant_value`]
/// per element, in f32, then converted.
pub(crate) fn dequant_nf4<T: Scalar>(a: DequantNf4<'_, Cpu<T>>) -> Result<()> {
    const OP: &str = "dequant_nf4";
    let n = a.n;
    let (codes, blocks, absmax) = crate::nf4::nf4_lens(n);
    check_len(OP, "y", a.y.len(), n)?;
    check_len(OP, "codes", a.codes.len(), codes)?;
    check_len(OP, "scale_codes", a.scale_codes.len(), blocks)?;
    check_len(OP, "absmax", a.absmax.len(), absmax)?;
    // Code8 holds each byte as a number on the CPU.
    let bytes = |v: &[T]| -> Vec<u8> { v.iter().map(|x| x.to_f32() as u8).collect() };
    let (c, sc) = (bytes(&a.codes[..codes]), bytes(&a.scale_codes[..blocks]));
    let am: Vec<f32> = a.absmax[..absmax].iter().map(|x| x.to_f32()).collect();
    let map = crate::codes::code_map(true);
    a.y[..n]
        .par_chunks_mut(crate::nf4::NF4_BLOCK)
        .enumerate()
        .for_each(|(blk, ys)| {
            let i0 = blk * crate::nf4::NF4_BLOCK;
            for (j, y) in ys.iter_mut().enumerate() {
                *y = T::from_f32(crate::nf4::dequant_value(&map, &c, &sc, &am, i0 + j));
            }
        });
    Ok(())
}
